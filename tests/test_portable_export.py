"""The export stage's portable folder: predict.py runs the int8 ONNX model with onnxruntime and the
torch.export program with torch, without dsframe, and predicts what the models in dsframe predict."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsframe.models.hub import load_tokenizer
from dsframe_compress.int8 import OrtModel, export_int8
from dsframe_compress.portable import tokenizer_agrees, write_portable
from dsframe_qat.scheme import choose_scheme

from tests._compress_util import tiny_bert

MAX_LEN = 16
TEXTS = ["a gripping, beautifully acted film", "ninety minutes of nothing",
         "an overlong, overwrought and utterly predictable thriller whose twists arrive with the subtlety of a "
         "brass band and whose cast deserves far better material",  # longer than MAX_LEN tokens: truncated
         "Amélie's café scenes are charming"]
# run predict.py with every dsframe module unimportable: the folder must not need the framework
NO_DSFRAME = ("import runpy, sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0].startswith('dsframe'):\n"
              "            raise ImportError('dsframe is not installed here: ' + name)\n"
              "sys.meta_path.insert(0, Block())\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """An exported tiny BERT with MiniLM's tokenizer, its folder copied away from where it was made."""
    model = tiny_bert(vocab=30522, hidden=32, heads=4, ffn=64)
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)  # random heads give near-tied logits
    model.eval()
    tok = load_tokenizer("minilm", key="data.tokenizer")
    made = tmp_path_factory.mktemp("export")
    export_int8(model, made, seq_len=MAX_LEN, scheme=choose_scheme())
    info = write_portable(made, model, tok, MAX_LEN, ("negative", "positive"), 2)
    folder = tmp_path_factory.mktemp("elsewhere") / "export"
    shutil.copytree(made, folder)
    return {"model": model, "tok": tok, "dir": folder, "info": info}


def _reference(portable) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the torch model and of the int8 ONNX model inside dsframe, on the data module's tokens."""
    tok = portable["tok"]
    enc = tok(TEXTS, truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = portable["model"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    int8 = OrtModel(portable["dir"] / "model_int8.onnx")(enc["input_ids"], enc["attention_mask"])
    return ref, int8


def _predict(python: str, folder: Path, *args: str, block_dsframe: bool = True) -> list[dict]:
    cmd = [python, "-c", NO_DSFRAME, str(folder / "predict.py")] if block_dsframe else [python, str(folder / "predict.py")]
    proc = subprocess.run([*cmd, "--json", *args, *TEXTS], capture_output=True, text=True, timeout=300,
                          cwd=folder.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_folder_holds_what_predict_needs(portable):
    folder = portable["dir"]
    cfg = json.loads((folder / "predict.json").read_text())
    assert cfg["max_length"] == MAX_LEN and cfg["labels"] == ["negative", "positive"]
    for name in (cfg["onnx"], cfg["torch"], cfg["tokenizer"], "predict.py"):
        assert (folder / name).is_file(), name
    # the tokenizers file reproduces the tokens dsframe trains and evaluates on, truncation included
    assert tokenizer_agrees(portable["tok"], TEXTS, folder / cfg["tokenizer"], MAX_LEN)
    assert len(portable["tok"](TEXTS[2])["input_ids"]) > MAX_LEN


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_predict_without_dsframe_matches_the_models(portable, runtime):
    ref, int8 = _reference(portable)
    rows = _predict(sys.executable, portable["dir"], "--runtime", runtime)
    got = torch.tensor([r["logits"] for r in rows], dtype=torch.float32)
    want = int8 if runtime == "onnx" else ref
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert [r["label"] for r in rows] == [["negative", "positive"][i] for i in want.argmax(-1).tolist()]
    assert all(abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)


@pytest.mark.slow
def test_readme_example_in_a_fresh_virtualenv_without_dsframe(portable, tmp_path):
    """The README's commands: a new virtualenv holding only onnxruntime, tokenizers and numpy, no
    dsframe, runs predict.py from the copied folder and gets the same predictions. (The torch path
    runs with dsframe's imports blocked above; installing torch again here would take a minute.)"""
    import onnxruntime
    import tokenizers

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"onnxruntime=={onnxruntime.__version__}", f"tokenizers=={tokenizers.__version__}", "numpy"],
                   check=True, timeout=600, capture_output=True)
    probe = subprocess.run([py, "-c", "import dsframe"], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'dsframe'" in probe.stderr
    ref, int8 = _reference(portable)
    rows = _predict(py, portable["dir"], block_dsframe=False)
    torch.testing.assert_close(torch.tensor([r["logits"] for r in rows], dtype=torch.float32), int8,
                               atol=1e-4, rtol=1e-4)
