"""The safe load enforces its allow-list privately: torch's process-wide list
(``torch.serialization.add_safe_globals``) is neither widened for other threads nor stripped of
what other libraries put there, and the unpickler calls or builds only allowed objects."""
import io
import pickle
import threading

import pytest
import torch

from mmdet_cam_hook.runtime import unpickler
from mmdet_cam_hook.runtime.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture
def torch_safe_globals():
    """Torch's process-wide allow-list, restored after the test."""
    before = torch.serialization.get_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)


@pytest.fixture
def history_file(tmp_path):
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(0.5)
    path = tmp_path / 'hub.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'message_hub': {'loss': buffer}}, path)
    return path


def test_entries_another_library_added_survive_our_load(history_file, torch_safe_globals):
    from mmengine.logging import HistoryBuffer

    theirs = unpickler.safe_globals()  # another library allows the same objects
    torch.serialization.add_safe_globals(theirs)
    assert load_checkpoint(history_file)['message_hub']['loss'].mean() == 0.5
    after = torch.serialization.get_safe_globals()
    assert HistoryBuffer in after and all(entry in after for entry in theirs)
    torch.load(history_file, weights_only=True)  # that library's own load still works


def test_other_threads_never_see_our_allow_list(history_file, torch_safe_globals):
    """While our load runs (``map_location`` is called in the middle of unpickling), an
    unrelated ``torch.load(weights_only=True)`` in another thread refuses HistoryBuffer, and
    torch's list is what it was."""
    before = set(torch.serialization.get_safe_globals())  # torch's own additions
    seen = []

    def other_thread():
        try:
            torch.load(history_file, weights_only=True)
            seen.append('loaded')
        except pickle.UnpicklingError:
            seen.append('refused')

    def map_location(storage, location):
        seen.append(set(torch.serialization.get_safe_globals()) == before)
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        return storage

    ckpt = load_checkpoint(history_file, map_location=map_location)
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))
    assert seen == [True, 'refused']


def _set_class_attribute_pickle() -> bytes:
    """A pickle that BUILDs the HistoryBuffer *class* with slot state ``{'mean': 1}``: a
    find_class allow-list alone would run ``setattr(HistoryBuffer, 'mean', 1)``."""
    return (b'\x80\x02cmmengine.logging.history_buffer\nHistoryBuffer\nN}X\x04\x00\x00\x00mean'
            b'K\x01s\x86b.')


def test_only_allowed_objects_are_built(tmp_path):
    from mmengine.logging import HistoryBuffer

    mean = HistoryBuffer.mean
    raw = _set_class_attribute_pickle()
    with pytest.raises(pickle.UnpicklingError, match='set the state of an instance of'):
        unpickler.load(io.BytesIO(raw))
    path = tmp_path / 'evil.pth'
    path.write_bytes(raw)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert HistoryBuffer.mean is mean


@pytest.mark.parametrize('raw, match', [
    (b'\x80\x02cposix\nsystem\n.', 'GLOBAL posix.system'),  # a global outside the list
    (b'\x80\x02c__builtin__\neval\n.', 'GLOBAL builtins.eval'),  # protocol 2 names
    (b'\x80\x02ccollections\nOrderedDict\n)R(K\x01e.', 'extends a OrderedDict'),
])
def test_unpickler_refusals(raw, match):

    with pytest.raises(pickle.UnpicklingError, match=match):
        unpickler.load(io.BytesIO(raw))


def test_protocol_2_names_are_mapped():
    assert unpickler.load(io.BytesIO(b'\x80\x02c__builtin__\nset\n)\x85R.')) == set()


def test_allow_list_holds_torch_and_ours():
    allowed = unpickler.allowed_globals()
    assert 'torch._utils._rebuild_tensor_v2' in allowed
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in allowed
    assert allowed['builtins.getattr'] is unpickler._restricted_getattr
    assert not any(name.startswith(('os.', 'posix.', 'subprocess.')) for name in allowed)


def test_forced_weights_only_falls_back_to_torchs_list(tmp_path, monkeypatch, history_file):
    """``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` makes torch refuse any pickle_module: a state dict
    still loads (torch's own list), a HistoryBuffer is refused, nothing is widened."""
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    path = tmp_path / 'plain.pth'
    torch.save({'state_dict': {'w': torch.ones(3)}}, path)
    assert torch.equal(load_checkpoint(path)['state_dict']['w'], torch.ones(3))
    with pytest.raises(CheckpointError, match='HistoryBuffer|numpy'):
        load_checkpoint(history_file)
