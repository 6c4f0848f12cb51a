"""Start-up: ``import llmarch`` and the CLI's parser load no torch (torch alone takes ~1 s to import); the lazy
names still resolve to the library's objects. (Validating a config does load torch: the registries its choices
are checked against live with the components.)"""
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_and_help_do_not_load_torch():
    assert "torch" not in _modules_after("import llmarch; llmarch.ModelConfig, llmarch.presets")
    assert "torch" not in _modules_after("from llmarch.cli import build_parser; build_parser().format_help()")
    assert "torch" in _modules_after("import llmarch; llmarch.build")  # the lazy names do load it


def test_lazy_names_resolve():
    import llmarch
    from llmarch.infer.generate import generate
    from llmarch.model import build
    from llmarch.upcycling import upcycle

    assert llmarch.build is build and llmarch.generate is generate and llmarch.upcycle is upcycle
    from llmarch import Model, analyze  # from-imports go through the same hook
    assert Model.__name__ == "Model" and callable(analyze)
