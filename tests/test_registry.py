"""Entry-point discovery: third-party components load like first-party ones; broken ones are named."""
import os
import textwrap

from tests.conftest import run_cli


def _fake_distribution(root, name, entry_points: str, modules: dict[str, str]):
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def test_list_shows_third_party_and_reports_broken_plugin(tmp_path):
    _fake_distribution(tmp_path, "ext_plugins", """
        [dsframe.plugins]
        noisy = ext_good:NoisyPlugin
        broken = ext_broken:Missing
        """, {
        "ext_good": '''
            from dsframe import Plugin
            class NoisyPlugin(Plugin):
                name = "noisy"
                description = "an outside plugin that adds nothing"
            ''',
        "ext_broken": "raise ImportError('libfoo.so not found')\n",
    })
    proc = run_cli("list", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "noisy" in out and "an outside plugin that adds nothing" in out
    assert "broken" in out and "libfoo.so not found" in out
    # the rest still load: built-in components and recipes are listed with descriptions
    assert "sentiment" in out and "movie_reviews" in out and "ddp" in out


def test_using_a_broken_plugin_is_one_clear_error(tmp_path):
    _fake_distribution(tmp_path, "ext_plugins", """
        [dsframe.plugins]
        broken = ext_broken:Missing
        """, {"ext_broken": "raise ImportError('libfoo.so not found')\n"})
    proc = run_cli("recipe=sentiment", "+recipe.stages.finetune.plugins=[broken]", cwd=tmp_path,
                   env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert proc.returncode == 1
    assert "broken" in proc.stderr and "libfoo.so not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_registry_lists_broken_entries_in_process(monkeypatch):
    from importlib.metadata import EntryPoint

    from dsframe.registry import Registry

    eps = [EntryPoint("ok", "dsframe.strategies:DDP", "dsframe.test"),
           EntryPoint("bad", "no_such_module_xyz:Thing", "dsframe.test")]
    monkeypatch.setattr("dsframe.registry.entry_points", lambda group: eps)
    reg = Registry("test")
    assert reg.names() == ["ok"]
    [broken] = reg.broken()
    assert broken.name == "bad" and "no_such_module_xyz" in broken.error


def test_outside_package_adds_a_recipe_through_hydra_search_path(tmp_path):
    (tmp_path / "hydra_plugins" / "ext_conf").mkdir(parents=True)
    (tmp_path / "hydra_plugins" / "ext_conf" / "__init__.py").write_text(textwrap.dedent('''
        from hydra.core.config_search_path import ConfigSearchPath
        from hydra.plugins.search_path_plugin import SearchPathPlugin

        class ExtSearchPath(SearchPathPlugin):
            def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
                search_path.append(provider="ext_pkg", path="pkg://ext_pkg.conf")
        '''))
    (tmp_path / "ext_pkg" / "conf" / "recipe").mkdir(parents=True)
    (tmp_path / "ext_pkg" / "__init__.py").write_text("")
    (tmp_path / "ext_pkg" / "conf" / "__init__.py").write_text("")
    (tmp_path / "ext_pkg" / "conf" / "recipe" / "ext_recipe.yaml").write_text(textwrap.dedent('''
        # @package _global_
        recipe:
          name: ext_recipe
          description: a recipe shipped by another package
          stages:
            finetune: {plugins: []}
        '''))
    proc = run_cli("list", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ext_recipe" in proc.stdout and "a recipe shipped by another package" in proc.stdout


def test_a_multirun_job_does_not_inherit_the_previous_jobs_master_port(monkeypatch):
    import dsframe.strategies as st

    monkeypatch.setattr(st, "_MASTER_PORT_AT_START", None)
    monkeypatch.setenv("MASTER_PORT", "41537")  # what Lightning's launcher left from the last job
    st.forget_previous_job_port()
    assert "MASTER_PORT" not in os.environ
    monkeypatch.setattr(st, "_MASTER_PORT_AT_START", "29500")  # torchrun / the user set it: kept
    monkeypatch.setenv("MASTER_PORT", "29500")
    st.forget_previous_job_port()
    assert os.environ["MASTER_PORT"] == "29500"


def test_locally_started_ranks_meet_below_the_ephemeral_port_range(monkeypatch):
    """Lightning's own pick (bind port 0) lies in the range outgoing connections take their source
    ports from, where another process can take it before rank 0 binds it (EADDRINUSE under load)."""
    import socket

    import dsframe.strategies as st

    for var in ("MASTER_PORT", "LOCAL_RANK", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    low = st._ephemeral_low()
    ports = set()
    for _ in range(5):
        monkeypatch.delenv("MASTER_PORT", raising=False)
        st.pick_local_port()
        port = int(os.environ["MASTER_PORT"])
        assert 1024 <= port < low
        with socket.socket() as sock:
            sock.bind(("", port))  # free when chosen
        ports.add(port)
    assert len(ports) > 1  # random: two jobs starting together do not both take the same one
    monkeypatch.setenv("MASTER_PORT", "29500")  # set by the user or torchrun: kept
    st.pick_local_port()
    assert os.environ["MASTER_PORT"] == "29500"
