"""Knowledge distillation: LD (``KnowledgeDistillationSingleStageDetector``, ``LDHead``) runs its
GFL student alone at test time (the teacher only feeds the training loss), so a detection is
the student's and is explained on the student's own maps. (LAD's ``LADHead`` is a PAA student:
:class:`~.atss_family.PAAAdapter`.)"""
from .base import ADAPTERS
from .gfl import GFLAdapter


@ADAPTERS.register_module()
class LDAdapter(GFLAdapter):
    """``LDHead`` (a ``GFLHead`` with the distillation loss): GFL's forward, decoding and score,
    ``sigmoid(cls_scores[l][0, a*C + c, y, x])``. The teacher (``teacher_model``) has no part
    in the prediction, and mmdet keeps it out of ``modules()`` and ``parameters()``: the
    default stages (the student's head, neck, backbone) are the whole model.
    """

    head_types = ('LDHead', )
    family = 'LD'
    detectors = 'LD (the GFL student)'
    doc_score = 'σ(cls[a, c]), the student\'s'
    doc_layers = '`neck.fpn_convs.{0..4}` (the student\'s)'
    doc_route = 'exact (GroupNorm head)'
