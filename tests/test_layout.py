"""Names that moved to a module of their own stay importable from the module that held them, as the very object
the new module defines: callers of `catrt.integrity`, `catrt.manifest`, `catrt.models.base` and `catrt.runtime` keep
working, and each name is defined once (a copy left behind would drift from the one the checks run)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

#: old module -> the module each moved name is defined in now -> the names.
MOVED: dict[str, dict[str, tuple[str, ...]]] = {
    "catrt.integrity": {
        "catrt.signing": ("BUNDLE_KEY_ENV", "canonical_manifest", "resolve_key", "sign_manifest", "signature_problems"),
        "catrt.file_checks": ("BUNDLE_FILES", "SETTLED_NS", "bundle_files", "file_problems", "name_problem"),
        "catrt.onnx_checks": ("onnx_graph_problems",),
        "catrt.manifest_consistency": ("consistency_problems",),
        "catrt.pipeline_facts": ("rows_per_image", "text_tokens_before"),
    },
    "catrt.manifest": {
        "catrt.provenance": (
            "VERSIONED_PACKAGES", "describe_device", "environment_problems", "package_versions", "transformer_config",
            "weights_digest",
        ),
    },
    "catrt.models.base": {
        "catrt.models.attention": (
            "AttentionRecorder", "attention", "attention_kwargs_change_nothing", "heads", "joint_attention", "merge_heads",
            "project_qkv", "refuse_call_attention_kwargs", "unfuse_hint",
        ),
        "catrt.models.modulation": ("gated_add_", "modulate_"),
        "catrt.contract": ("Context",),
    },
    "catrt.runtime": {
        "catrt.step_state": ("MAX_KEPT_ALPHAS", "RuntimeBuffers", "StepState"),
        "catrt.cuda_graphs": ("CapturedStep",),
        "catrt.contract": ("StepFunctions",),
    },
}
CASES = [(old, new, name) for old, homes in MOVED.items() for new, names in homes.items() for name in names]


@pytest.mark.parametrize(("old", "new", "name"), CASES, ids=[f"{old}.{name}" for old, _, name in CASES])
def test_a_moved_name_is_importable_from_its_old_module_as_the_same_object(old: str, new: str, name: str) -> None:
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize("module", sorted(MOVED))
def test_a_module_declares_the_names_it_reexports(module: str) -> None:
    """`__all__` lists the moved names beside the module's own, and only names it has (a star import gets them all)."""
    loaded = importlib.import_module(module)
    moved = {name for names in MOVED[module].values() for name in names}
    assert moved <= set(loaded.__all__)
    assert [name for name in loaded.__all__ if not hasattr(loaded, name)] == []


@pytest.mark.parametrize("module", ["catrt.cuda_graphs", "catrt.step_state", "catrt.contract"])
def test_a_module_split_from_the_runtime_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """Imported before `catrt.runtime`, as a user or a test may: an import cycle through the runtime would fail here."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
