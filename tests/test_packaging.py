"""A built wheel (what a plain `pip install .` installs) carries the default model and the chat page."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_default_model_and_the_static_page(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("mimo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f"mimo/models/mimo-tiny/{f}" in names, f
    assert {"mimo/serve/static/index.html", "mimo/serve/static/app.js", "mimo/serve/static/style.css"} <= names


def test_the_repository_path_is_the_packaged_model():
    from mimo.engine.config import DEFAULT_MODEL

    assert (ROOT / "models" / "mimo-tiny").resolve() == DEFAULT_MODEL.resolve()
    assert DEFAULT_MODEL.is_relative_to(ROOT / "src" / "mimo")
