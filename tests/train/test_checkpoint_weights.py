"""model.safetensors round trips for the weight layouts models really have: tied weights, and the
cuDNN layout (on CUDA nn.RNN/LSTM/GRU weights are views into one flat buffer, which safetensors'
save_model refuses: the first GPU run found every LSTM/GRU/RNN checkpoint failing)."""
import torch
from torch import nn

from matrec.models import build_model
from matrec.train.checkpoint import load_model_weights, save_checkpoint


class FlatViews(nn.Module):
    """Two parameters that are views into one buffer, as cuDNN's flatten_parameters leaves them."""

    def __init__(self):
        super().__init__()
        flat = torch.randn(12)
        self.a = nn.Parameter(flat[:6].view(2, 3))
        self.b = nn.Parameter(flat[6:].view(6))


def test_views_into_one_buffer_save_and_load(tmp_path):
    torch.manual_seed(0)
    src, dst = FlatViews(), FlatViews()
    assert src.a.untyped_storage().data_ptr() == src.b.untyped_storage().data_ptr()
    path = save_checkpoint(tmp_path, model=src, tensors={}, meta={"step": 1})
    load_model_weights(dst, path)
    assert torch.equal(dst.a, src.a) and torch.equal(dst.b, src.b)


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    src = build_model("attn", vocab_size=11, output_size=11, d_model=16, n_layers=1, n_heads=2)
    torch.manual_seed(1)
    dst = build_model("attn", vocab_size=11, output_size=11, d_model=16, n_layers=1, n_heads=2)
    tied = [n for n, t in src.state_dict().items() if t.data_ptr() == src.state_dict()["encoder.weight"].data_ptr()]
    path = save_checkpoint(tmp_path, model=src, tensors={}, meta={"step": 1})
    load_model_weights(dst, path)
    for name, t in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], t), name
    if len(tied) > 1:  # the tie survives the load: one tensor, two names
        assert len({dst.state_dict()[n].data_ptr() for n in tied}) == 1


def test_files_written_by_safetensors_save_model_still_load(tmp_path):
    from safetensors.torch import save_model

    torch.manual_seed(0)
    src = build_model("attn", vocab_size=11, output_size=11, d_model=16, n_layers=1, n_heads=2)
    dst = build_model("attn", vocab_size=11, output_size=11, d_model=16, n_layers=1, n_heads=2)
    save_model(src, str(tmp_path / "model.safetensors"))
    load_model_weights(dst, tmp_path)
    for name, t in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], t), name


def test_a_recurrent_model_round_trips(tmp_path):
    src = build_model("lstm", vocab_size=5, output_size=5, hidden_size=8)
    dst = build_model("lstm", vocab_size=5, output_size=5, hidden_size=8)
    load_model_weights(dst, save_checkpoint(tmp_path, model=src, tensors={}, meta={"step": 3}))
    for name, t in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], t), name
