"""Gaps a new user's walk through README found in the CLI (the catrt/cli/ package), left for the lead to fix: the
walkthrough was told not to edit the CLI while it was being split into that package.

TESTS MARKED `xfail(strict=True)` HERE FAIL ON PURPOSE until the lead applies the fix each one names (the walkthrough
branch's report gives the file, function and change); once a fix is in, its test passes, strict xfail turns that
into a failure, and the marker is to be removed. The unmarked tests pin what already holds beside them.
"""

from __future__ import annotations

import re

import pytest

from catrt.cli import main
from catrt.model_cards import MODEL_CARDS

PENDING_SPLIT = "CLI fix pending (the walkthrough did not edit catrt/cli/): see the walkthrough branch's report"


def flag_help(command: str, flag: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The help text `catrt COMMAND --help` prints for FLAG, on one line (wide: argparse wraps at hyphens)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    match = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|^\S|\Z)", text, flags=re.M | re.S)
    assert match, f"catrt {command} --help has no {flag}"
    return " ".join(match.group(1).split())


# Where --steps / --t0 are not given, generate, serve and build run a published model's own schedule
# (`_card_schedule`: FLUX.1-schnell 4 steps with t0 2, PixArt-Sigma 20 steps), so each command's --help must say so.
OWN_T0 = {name: card.default_t0 for name, card in MODEL_CARDS.items() if card.default_t0 is not None}
OWN_STEPS = {name: card.default_steps for name, card in MODEL_CARDS.items() if card.default_steps != 28}


@pytest.mark.parametrize(("command", "flag", "own"), [
    ("build", "--t0", OWN_T0),
    ("build", "--steps", OWN_STEPS),
    ("serve", "--steps", OWN_STEPS),
    # catrt/cli/cat_flags.add_cat_flags writes every CAT flag's default from CATConfig(), so --t0 says "(default: 8)"
    # where flux-schnell runs t0 2; the fix: an `own_schedule` flag of add_cat_flags, given by generate and serve (not
    # compare or macs, which run t0 8 for every model), that appends "; a published model's own where it has one, 2 for
    # flux-schnell" to --t0's text, keeping "(default: 8)", which tests/test_cli.py's help test pins.
    pytest.param("generate", "--t0", OWN_T0, marks=pytest.mark.xfail(strict=True, reason=PENDING_SPLIT)),
    pytest.param("serve", "--t0", OWN_T0, marks=pytest.mark.xfail(strict=True, reason=PENDING_SPLIT)),
    # catrt/cli/generate.py (the parser): "--steps ... (default: the pipeline's, 28 for SD3; ...)": flux-schnell runs 4 where
    # FluxPipeline's default is 28; the fix: serve's wording, "(default: the model's own, e.g. 20 for pixart-sigma,
    # 4 for flux-schnell; else the pipeline's, 28 for SD3; the build's with --engines)".
    pytest.param("generate", "--steps", OWN_STEPS, marks=pytest.mark.xfail(strict=True, reason=PENDING_SPLIT)),
])
def test_help_names_each_published_models_own_schedule(
    command: str, flag: str, own: dict[str, int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert own, "no model card sets its own schedule: this test has nothing to check"
    text = flag_help(command, flag, capsys, monkeypatch)
    for name, value in own.items():
        assert f"{value} for {name}" in text, f"catrt {command} --help: {flag} {text!r} does not say {name} runs {value}"


@pytest.mark.parametrize("argv", [
    ["generate", "--promt", "a red circle"],
    ["compare", "--promts", "prompts.txt", "--out", "out"],
])
@pytest.mark.xfail(strict=True, reason=PENDING_SPLIT)
def test_a_mistyped_flag_is_named_even_when_a_required_one_is_missing(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`catrt generate --promt x` answered only "the following arguments are required: --prompt", never naming the
    flag the user mistyped. argparse checks required flags inside the subparser, before the unrecognized words reach
    OneLineParser.parse_args. The fix (catrt/cli/parsing.OneLineParser): remember the words a parser parses (override
    `_parse_known_args(self, arg_strings, *rest)` to keep `arg_strings`), and in `error`, for a "the following
    arguments are required" message, put first the option-like words none of the parser's option strings takes
    (the part before '=', allowing argparse's unique prefixes): "unrecognized arguments: --promt; the following
    arguments are required: --prompt (see catrt generate --help)"."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(err) == 1, err
    mistyped = next(word for word in argv if word in ("--promt", "--promts"))
    assert f"unrecognized arguments: {mistyped}" in err[0] and "are required" in err[0], err[0]
    assert err[0].endswith(f"(see catrt {argv[0]} --help)")


def test_a_mistyped_flag_beside_every_required_one_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "a red circle", "--sed", "3"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "catrt generate: error: unrecognized arguments: --sed 3 (see catrt generate --help)"]


@pytest.mark.parametrize("command", [
    # catrt/cli/generate.py and catrt/cli/build.py (the parsers): "--precision ... on CUDA the model's usual one: sd3, pixart-sigma
    # fp16; ... bf16; others fp32" where model_cards.default_precision runs a local diffusers folder on CUDA in the
    # dtype its transformer was saved in (242ceee), as README says; the fix: "...; others fp32, but a local diffusers
    # folder the dtype its transformer was saved in)" (build: after "... cannot build, fp32"), after "; others", where
    # tests/test_cli.py's precision-help test stops reading the list of published models.
    pytest.param("generate", marks=pytest.mark.xfail(strict=True, reason=PENDING_SPLIT)),
    pytest.param("build", marks=pytest.mark.xfail(strict=True, reason=PENDING_SPLIT)),
])
def test_precision_help_says_a_local_folder_runs_its_saved_dtype_on_cuda(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = flag_help(command, "--precision", capsys, monkeypatch)
    assert "others fp32" in text or "others, and" in text  # the list this test reads is still there
    assert "folder" in text and "saved" in text, f"catrt {command} --help: --precision {text!r}"
