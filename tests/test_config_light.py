"""A wrong option is reported without importing torch or Lightning (issue: "every config error
appears in about a second"). Each component registers its ``Config`` in ``dsframe.configs.<kind>``,
in a module without torch; the check below runs the real command line in a fresh interpreter and
looks at what it imported, so it holds on any machine, however fast."""
import subprocess
import sys

import pytest

HEAVY = ("torch", "lightning", "transformers", "torchmetrics", "onnxruntime")

PROBE = """
import sys
from dsframe.cli import main
sys.argv = ["dsframe", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
""".replace("{HEAVY!r}", repr(HEAVY))

CASES = {
    "plugin prune": (["recipe=bert_compress", "plugins.prune.amount=2"], "plugins.prune.amount"),
    "plugin qat": (["recipe=bert_compress", "plugins.qat.scheme=w9"], "plugins.qat.scheme"),
    "plugin distill": (["recipe=bert_compress", "plugins.distill.alpha=3"], "plugins.distill.alpha"),
    "plugin scheduler": (["recipe=sentiment", "recipe.stages.finetune.plugins+=[scheduler]",
                          "plugins.scheduler.max_batch=64", "plugins.scheduler.lam=-1"], "plugins.scheduler.lam"),
    "model bert": (["recipe=sentiment", "+model.hf_config.num_attention_heads=5"],
                   "model.hf_config.num_attention_heads"),
    "model gpt": (["recipe=lm_hybrid_parallel", "model.n_head=3"], "model.n_embd"),
    "data movie_reviews": (["recipe=bert_compress", "data.batch_size=-1"], "data.batch_size"),
    "data text_corpus": (["recipe=lm_hybrid_parallel", "data.val_fraction=0.9"], "data.val_fraction"),
    "stage export": (["recipe=bert_compress", "recipe.stages.export.options.vocab=foo"],
                     "recipe.stages.export.options.vocab"),
    "stage evaluate": (["recipe=bert_compress", "recipe.stages.evaluate.options.repeats=1"],
                       "recipe.stages.evaluate.options.repeats"),
    "layout": (["recipe=lm_hybrid_parallel", "strategy.tp=3"], "trainer.devices"),
    "model multimodal": (["recipe=multimodal_digits", "model.width=7"], "model.heads"),
    "encoder resnet": (["recipe=multimodal_digits", "model.encoders.image.groups=5"], "model.encoders.image.groups"),
    "encoder of another modality": (["recipe=multimodal_digits", "model.encoders.image.kind=mfcc"],
                                    "model.encoders.image.kind"),
    "data av_digits": (["recipe=multimodal_digits", "data.audio_source=foo"], "data.audio_source"),
    "stage multimodal_evaluate": (["recipe=multimodal_digits", "recipe.stages.evaluate.options.latency_reps=0"],
                                  "recipe.stages.evaluate.options.latency_reps"),
}


@pytest.mark.parametrize("overrides,key", list(CASES.values()), ids=list(CASES))
def test_config_error_imports_no_torch(tmp_path, overrides, key):
    proc = subprocess.run([sys.executable, "-c", PROBE, *overrides], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-1] == "HEAVY=", f"imported {lines[-1]} to report: {lines[:-1]}"
    assert len(lines) == 2 and lines[0].startswith("dsframe: error: ") and key in lines[0], proc.stderr
    assert not any(tmp_path.iterdir()), "a config error leaves no run directory"


def test_registered_options_match_their_components():
    """What dsframe.configs.<kind> registers is the Config the component itself uses (and an
    encoder's modality read from its Config is the encoder's): the fast path checks the same thing."""
    from dsframe import registry

    for reg in registry.ALL.values():
        for name in reg.installed():
            schema = reg.config_class(name)
            component = reg.get(name)
            assert schema is getattr(component, "Config", None), (reg.kind, name)
            if reg.kind == "encoders":
                assert schema.modality == component.modality, name
            if "description" in vars(schema or object) and hasattr(component, "description"):  # `list` shows it
                assert schema.description == component.description, name


def test_list_imports_no_torch(tmp_path):
    """``python -m dsframe list`` describes every first-party component from its registered Config."""
    code = ("import sys\nfrom dsframe.cli import main\nsys.argv = ['dsframe', 'list']\nmain()\n"
            f"print('HEAVY=' + ','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY="
    for name in ("prune", "qat", "distill", "scheduler", "bert", "gpt", "multimodal", "movie_reviews", "av_digits",
                 "hybrid", "compress_export", "resnet", "wav2vec"):
        assert f"\n{name} " in proc.stdout, name
