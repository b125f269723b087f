"""Text-prompted detectors for offline tests: a tiny BERT made with ``transformers``' own
classes and saved into a folder, and mmdet's Grounding DINO config pointed at it.

Nothing is downloaded: mmdet's configs name ``bert-base-uncased`` (fetched from the Hugging
Face hub); here the tokenizer is a ``BertTokenizer`` over a vocabulary file the test writes and
the text encoder a random 2-layer ``BertModel``, both ``save_pretrained`` into ``folder``, so
mmdet's real language-model code runs on a real (tiny, random) encoder.
"""
from pathlib import Path
from typing import Optional, Sequence

import torch

from .models import build_detector
from .runs import tiny_cfg

#: Words of the tiny vocabulary (after BERT's special tokens): the shapes demo's classes, the
#: tests' prompts, and mmdet's separators.
WORDS = ('.', ',', '?', 'a', 'the', 'red', 'blue', 'green', 'car', 'person', 'dog', 'cat',
         'circle', 'square', 'triangle', 'object', 'thing', 'big', 'small', 'class')

GROUNDING_DINO = 'grounding_dino/grounding_dino_r50_scratch_8xb2_1x_coco.py'
MM_GROUNDING_DINO = 'mm_grounding_dino/grounding_dino_swin-t_pretrain_obj365.py'
#: A Swin-T shrunk for CPU tests (1-1-1-1 blocks of 16 channels; out_indices 1-3).
SMALL_SWIN = {'model.backbone.embed_dims': 16, 'model.backbone.depths': [1, 1, 1, 1],
              'model.backbone.num_heads': [1, 1, 2, 2], 'model.neck.in_channels': [32, 64, 128],
              'model.backbone.with_cp': False}
#: Grounding DINO shrunk for CPU tests (the adapter reads the head's outputs, not the widths).
SMALL_GROUNDING = {'model.backbone.depth': 18, 'model.backbone.base_channels': 16,
                   'model.neck.in_channels': [32, 64, 128], 'model.num_queries': 30,
                   'model.test_cfg.max_per_img': 30, 'model.encoder.num_layers': 2,
                   'model.decoder.num_layers': 2, 'model.encoder.num_cp': 0}


def tiny_bert(folder, words: Sequence[str] = WORDS, hidden_size: int = 32,
              seed: int = 0, num_layers: int = 2) -> str:
    """Save a random 2-layer BERT and its tokenizer into ``folder``.

    Args:
        folder (str | PathLike): Where to save (created).
        words (Sequence[str]): The vocabulary after ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
        hidden_size (int): The encoder's width. Defaults to 32.
        seed (int): Seed of the random weights. Defaults to 0.
        num_layers (int): Encoder layers (BERT-base has 12 of width 768). Defaults to 2.

    Returns:
        str: ``folder``, for a config's ``lang_model_name``.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / 'vocab.txt'
    vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *words]) + '\n')
    BertTokenizer(str(vocab)).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=hidden_size,
                        num_hidden_layers=num_layers, num_attention_heads=2,
                        intermediate_size=2 * hidden_size, max_position_embeddings=256)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


def build_grounding_dino(bert: str, input_size: int = 128, seed: int = 0,
                         cfg_options: Optional[dict] = None,
                         classes: Sequence[str] = ('red car', 'person', 'dog'),
                         config: str = GROUNDING_DINO, small: bool = True) -> torch.nn.Module:
    """A random-init Grounding DINO from mmdet's own config with the tiny BERT at ``bert`` (see
    :func:`tiny_bert`), shrunk (:data:`SMALL_GROUNDING`; a Swin backbone as
    :data:`SMALL_SWIN`), ``.cfg`` set and ``dataset_meta``'s classes ``classes``, in eval mode.

    Args:
        bert (str): Folder of the saved BERT and tokenizer.
        input_size (int): The test pipeline's resize. Defaults to 128.
        seed (int): Seed of the random init. Defaults to 0.
        cfg_options (dict, optional): More config overrides.
        classes (Sequence[str]): The model's class names (its default prompt).
        config (str): mmdet's config, :data:`GROUNDING_DINO` (ResNet-50, from scratch) or
            :data:`MM_GROUNDING_DINO` (MM-Grounding-DINO, Swin-T). Defaults to the first.
        small (bool): Shrink it (False: the config's own sizes, 900 queries, 6+6 layers, for
            benchmarks; activation checkpointing still off). Defaults to True.

    Returns:
        nn.Module: The detector.
    """
    small_opts = dict(SMALL_GROUNDING) if small else {'model.encoder.num_cp': 0}
    if small and 'swin' in config:
        for key in ('model.backbone.depth', 'model.backbone.base_channels'):
            small_opts.pop(key)
        small_opts.update(SMALL_SWIN)
    options = {**small_opts, 'model.language_model.name': bert, **(cfg_options or {})}
    model = build_detector(config, input_size=input_size, seed=seed,
                           cfg_options=options, num_classes=len(classes))
    model.dataset_meta = dict(classes=tuple(classes))
    return model


def tiny_grounding_cfg(data, work_dir, bert: str, **kwargs):
    """:func:`~mmdet_cam_hook.testing.tiny_cfg` for a Grounding DINO fine-tuning run on the
    shapes data set, prompted as mmdet's own configs prompt it: the datasets return their class
    names (``return_classes=True``: each sample's ``text``, ``custom_entities``), which
    ``PackDetInputs`` keeps; the model shrunk (:data:`SMALL_GROUNDING`) with the tiny BERT at
    ``bert``.

    Args:
        data (ShapesDataset): A generated dataset (:func:`..demo.shapes.generate_shapes`).
        work_dir (str | PathLike): The runner's work_dir.
        bert (str): Folder of the saved BERT (:func:`tiny_bert`).
        **kwargs: More :func:`~mmdet_cam_hook.testing.tiny_cfg` arguments.

    Returns:
        Config: The run's config.
    """
    cfg = tiny_cfg(data, work_dir, detector='grounding-dino', **kwargs)
    cfg.merge_from_dict({**SMALL_GROUNDING, 'model.language_model.name': bert})
    cfg.optim_wrapper.optimizer.lr = 1e-4
    train = cfg.train_dataloader.dataset
    for dataset in (train, cfg.val_dataloader.dataset):
        dataset.return_classes = True
        pack = dataset.pipeline[-1]
        keys = pack.get('meta_keys', ('img_id', 'img_path', 'ori_shape', 'img_shape',
                                      'scale_factor', 'flip', 'flip_direction'))
        pack.meta_keys = (*keys, 'text', 'custom_entities')
    cfg.test_dataloader = cfg.val_dataloader
    return cfg


GLIP = 'glip/glip_atss_swin-t_a_fpn_dyhead_pretrain_obj365.py'
#: GLIP shrunk for CPU tests: a 1-1-1-1 Swin of 16 channels, one DyHead block.
SMALL_GLIP = {'model.backbone.embed_dims': 16, 'model.backbone.depths': [1, 1, 1, 1],
              'model.backbone.num_heads': [1, 1, 2, 2], 'model.neck.in_channels': [32, 64, 128],
              'model.bbox_head.num_dyhead_blocks': 4}


def build_glip(bert: str, input_size: int = 128, seed: int = 0,
               classes: Sequence[str] = ('red car', 'person', 'dog')) -> torch.nn.Module:
    """A random-init GLIP from mmdet's own config with the tiny BERT at ``bert`` as its language
    model and its head's fusion layers' config, shrunk (:data:`SMALL_GLIP`), like
    :func:`build_grounding_dino`."""
    options = {**SMALL_GLIP, 'model.language_model.name': bert,
               'model.bbox_head.lang_model_name': bert}
    model = build_detector(GLIP, input_size=input_size, seed=seed, cfg_options=options,
                           num_classes=len(classes))
    model.dataset_meta = dict(classes=tuple(classes))
    return model
