"""Model artifacts: save, reload to the same outputs, clear errors on bad files."""
import pytest
import torch

from dsframe.errors import CheckpointError
from dsframe.models.files import load_model, save_model
from dsframe.models.bert import BertClassifier, BertConfig, layer_heads

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return BertClassifier.build(BertConfig(pretrained=False, hf_config=TINY)).eval()


def test_roundtrip_gives_identical_logits(model, tmp_path):
    ids = torch.randint(0, 1000, (3, 12))
    path = save_model(model, tmp_path / "m.pt")
    again = load_model(path).eval()
    assert torch.equal(model(ids), again(ids))


def test_physically_smaller_layers_reload_at_their_own_size(model, tmp_path):
    layer = model.encoder.encoder.layer[0]
    attn, size = layer.attention.self, layer.attention.self.attention_head_size
    keep = torch.tensor([0, 2])  # keep heads 0 and 2, drop the others
    rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep])
    for name in ("query", "key", "value"):
        old = getattr(attn, name)
        new = torch.nn.Linear(old.in_features, len(rows))
        new.weight.data, new.bias.data = old.weight.data[rows].clone(), old.bias.data[rows].clone()
        setattr(attn, name, new)
    dense = layer.attention.output.dense
    new = torch.nn.Linear(len(rows), dense.out_features)
    new.weight.data, new.bias.data = dense.weight.data[:, rows].clone(), dense.bias.data.clone()
    layer.attention.output.dense = new
    ids = torch.randint(0, 1000, (2, 9))
    expected = model(ids)
    again = load_model(save_model(model, tmp_path / "pruned.pt")).eval()
    assert [layer_heads(lay) for lay in again.encoder.encoder.layer] == [2, 4]
    assert torch.allclose(again(ids), expected, atol=1e-6)


def test_corrupt_missing_and_foreign_files(model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt model file"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a dsframe model file"):
        load_model(tmp_path / "foreign.pt")
    path = save_model(model, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="holds a 'bert' model, expected 'gpt'"):
        load_model(path, expect_kind="gpt")
