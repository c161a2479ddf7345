"""Gaps a new user's walk through README found in the CLI: each command's --help states the schedule and dtype it
really runs (a published model's own steps / t0, a local folder's saved dtype), and a mistyped flag is named even
when argparse would first report a missing required one."""

from __future__ import annotations

import re

import pytest

from catrt.cli import main
from catrt.model_cards import MODEL_CARDS


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
    ("generate", "--t0", OWN_T0),  # CAT flags are generated from CATConfig: "(default: 8)" alone said nothing of these
    ("serve", "--t0", OWN_T0),
    ("generate", "--steps", OWN_STEPS),  # said "the pipeline's, 28 for SD3": FluxPipeline's 28, where schnell runs 4
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
    ["serve", "--modle", "reference"],  # a required one of a group: "one of the arguments --engines --model is required"
])
def test_a_mistyped_flag_is_named_even_when_a_required_one_is_missing(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`catrt generate --promt x` answered only "the following arguments are required: --prompt", never naming the
    flag the user mistyped: argparse checks required flags inside the subparser, before the unrecognized words reach
    OneLineParser.parse_args, so its `error` names them itself."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(err) == 1, err
    mistyped = next(word for word in argv if word in ("--promt", "--promts", "--modle"))
    assert f"unrecognized arguments: {mistyped}; " in err[0] and "required" in err[0], err[0]
    assert err[0].endswith(f"(see catrt {argv[0]} --help)")


@pytest.mark.parametrize(("argv", "named"), [
    (["generate", "\u2014prompt", "a red circle"], "\u2014prompt (typed with a typographic dash: --prompt)"),  # em dash
    (["generate", "\u2013prompt=a red circle"], "\u2013prompt (typed with a typographic dash: --prompt)"),  # en dash
    (["compare", "\u2014prompts", "p.txt", "--out", "out"], "\u2014prompts (typed with a typographic dash: --prompts)"),
    (["generate", "--prompt", "x", "\u2014seed", "3"], "\u2014seed (typed with a typographic dash: --seed) 3"),
])
def test_a_flag_typed_with_a_typographic_dash_is_named(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`catrt generate \u2014prompt x` (a web page's or an editor's `--`) answered only "--prompt is required": argparse
    takes a word without an ASCII dash for a value, so the user was told to give what they believed they gave."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"catrt {argv[0]}: error: unrecognized arguments: {named}"), err[0]


def test_a_value_beginning_with_a_typographic_dash_stays_a_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--negative-prompt", "\u2014dark"])
    assert capsys.readouterr().err.splitlines() == [
        "catrt generate: error: the following arguments are required: --prompt (see catrt generate --help)"]


@pytest.mark.parametrize("argv", [
    ["generate", "--seed", "-3"],  # a negative number is a value
    ["generate", "--see", "3", "--neg=x"],  # unique prefixes of --seed and --negative-prompt, as argparse takes them
    ["generate", "--seed", "3", "--", "--promt"],  # after --, words are values
    ["generate", "--negative-prompt", "-blurry, dark"],  # a word with a space is a value to argparse, even after a dash
    ["generate", "-vv"],  # -v -v, as argparse reads a run of single-letter flags
])
def test_only_words_no_option_takes_are_named_beside_a_missing_required_flag(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "catrt generate: error: the following arguments are required: --prompt (see catrt generate --help)"]


def test_a_mistyped_flag_beside_every_required_one_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "a red circle", "--sed", "3"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "catrt generate: error: unrecognized arguments: --sed 3 (see catrt generate --help)"]


# "others fp32" alone was untrue on CUDA for a local diffusers folder, which runs the dtype it was saved in (242ceee).
@pytest.mark.parametrize("command", ["generate", "build"])
def test_precision_help_says_a_local_folder_runs_its_saved_dtype_on_cuda(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = flag_help(command, "--precision", capsys, monkeypatch)
    assert "others fp32" in text or "others, and" in text  # the list this test reads is still there
    assert "folder" in text and "saved" in text, f"catrt {command} --help: --precision {text!r}"
