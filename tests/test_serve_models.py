"""`catrt serve` over each supported model, with the API key, and its start-up refusals.

Five servers run for the module, started together: the reference model (the CLI's default) eagerly
with a key file and `--metrics-auth`, tiny PixArt-Sigma with the key from `CATRT_API_KEY`, tiny
SD3.5 in bf16 with no key, tiny FLUX.1-dev (distilled guidance, packed latents), and a signed engine bundle of the reference model served with its
bundle key. Each serves the stock OpenAI SDK call at its own size.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image
from test_serve_support import (
    CLI,
    LISTENING,
    RemoteServer,
    assert_error,
    assert_one_line_refusal,
    generate,
    openapi_request_schema,
    png,
    run_cli,
    server_env,
    start_all,
    stop_all,
)

from catrt.build import build_engines
from catrt.build_config import BuildConfig

FILE_KEY = "file-key-0123456789"
ENV_KEY = "env-key-9876543210"
BUNDLE_KEY = b"bundle-signing-key"
FAST = ["--steps", "3", "--t0", "2"]
# `catrt` that writes, as its last line on stderr, which of the packages that take seconds to import (the model's
# torch and diffusers) it imported: what makes a refusal or the help quick, read without a clock.
IMPORTS_CLI = [sys.executable, "-c", """
import atexit, sys
atexit.register(lambda: print("imported:", *sorted(name for name in ("diffusers", "torch") if name in sys.modules),
                              file=sys.stderr))
from catrt.cli import main
sys.exit(main(sys.argv[1:]))
"""]


@dataclass(frozen=True)
class Served:
    """What a test server should answer with."""

    args: list[str]
    size: str
    text_tokens: int
    key: str | None = None
    env: dict[str, str] | None = None


SERVED = {
    "reference": Served(["--model", "reference", *FAST, "--metrics-auth"], "32x32", 16, FILE_KEY),
    "tiny-pixart": Served(["--model", "tiny-pixart", "--height", "64", "--width", "64", *FAST], "64x64", 300, ENV_KEY,
                          {"CATRT_API_KEY": ENV_KEY}),
    "tiny-sd3.5": Served(["--model", "tiny-sd3.5", "--height", "32", "--width", "64", *FAST, "--batch", "2",
                          "--precision", "bf16"], "64x32", 256),
    "tiny-flux": Served(["--model", "tiny-flux", "--height", "32", "--width", "64", *FAST], "64x32", 512),
    "reference-bundle": Served([], "32x32", 16),
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signed engine bundle of the reference model (the eager backend: no export, built in seconds)."""
    folder = tmp_path_factory.mktemp("serve-models")
    build = BuildConfig("reference", height=32, width=32, batch=1, steps=3, t0=2, backend="eager")
    return build_engines(build, out_dir=folder / "engines", export_dir=folder / "export", progress=False,
                         sign_key=BUNDLE_KEY)


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    files = {"api": folder / "api-key", "bundle": folder / "bundle-key", "wrong": folder / "wrong-key"}
    files["api"].write_text(FILE_KEY + "\n")
    files["bundle"].write_bytes(BUNDLE_KEY)
    files["wrong"].write_bytes(b"another-key")
    return files


@pytest.fixture(scope="module")
def servers(bundle: Path, key_files: dict[str, Path]) -> Iterator[dict[str, RemoteServer]]:
    arguments = {
        "reference": [*SERVED["reference"].args, "--api-key-file", str(key_files["api"])],
        "tiny-pixart": SERVED["tiny-pixart"].args,
        "tiny-sd3.5": SERVED["tiny-sd3.5"].args,
        "tiny-flux": SERVED["tiny-flux"].args,
        "reference-bundle": ["--engines", str(bundle), "--bundle-key-file", str(key_files["bundle"])],
    }
    started = {name: RemoteServer(CLI, args, SERVED[name].env) for name, args in arguments.items()}
    start_all(started)
    yield started
    stop_all(started)


def _headers(name: str) -> dict[str, str]:
    key = SERVED[name].key
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("name", list(SERVED))
def test_each_supported_model_serves_the_stock_sdk_call(servers: dict[str, RemoteServer], name: str) -> None:
    served = SERVED[name]
    client = openai.OpenAI(base_url=f"{servers[name].url}/v1", api_key=served.key or "unused")
    result = client.images.generate(model="dall-e-3", prompt="a red circle", size=served.size, quality="standard",
                                    style="vivid")
    width, height = map(int, served.size.split("x"))
    with Image.open(io.BytesIO(png(result.data[0].b64_json))) as image:
        assert image.format == "PNG" and image.size == (width, height)
    assert result.model_extra["catrt"]["steps"] == 3


@pytest.mark.parametrize("name", list(SERVED))
def test_each_model_states_and_applies_its_own_text_limit(servers: dict[str, RemoteServer], name: str) -> None:
    served = SERVED[name]
    schema = openapi_request_schema(servers[name].url)["properties"]
    assert schema["size"]["anyOf"][0]["enum"] == [served.size, "auto"]
    assert f"{served.text_tokens} tokens" in schema["prompt"]["description"]
    words = "red " * (served.text_tokens + 1)  # one token per word at least, plus a start or end token
    error = assert_error(generate(servers[name].url, headers=_headers(name), prompt=words), 400, "prompt")
    assert f"at most {served.text_tokens}" in error["message"]
    assert generate(servers[name].url, headers=_headers(name), size="auto").status_code == 200


def test_the_api_key_guards_v1_and_optionally_metrics(servers: dict[str, RemoteServer]) -> None:
    url = servers["reference"].url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {FILE_KEY}"},
                    {"Authorization": FILE_KEY}, {"Authorization": f"Bearer {FILE_KEY}x"}):
        response = generate(url, headers=headers)
        assert "API key" in assert_error(response, 401, None)["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert generate(url, headers={"Authorization": f"bearer {FILE_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/health/live").status_code == 200
    assert httpx.get(f"{url}/health/ready").status_code == 200
    assert_error(httpx.get(f"{url}/metrics"), 401, None)
    metrics = httpx.get(f"{url}/metrics", headers=_headers("reference")).text
    assert 'catrt_requests_total{route="/v1/images/generations",status="401"} 5.0' in metrics
    document = httpx.get(f"{url}/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/v1/images/generations"]["post"]["security"] == [{"bearer": []}]
    assert document["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]


def test_the_key_from_the_environment_leaves_metrics_open(servers: dict[str, RemoteServer]) -> None:
    url = servers["tiny-pixart"].url
    assert_error(generate(url), 401, None)
    assert generate(url, headers=_headers("tiny-pixart")).status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert generate(servers["tiny-sd3.5"].url).status_code == 200  # no key: open


# -- start-up refusals: one line on stderr, exit 2, no traceback -------------------------------


def test_a_port_in_use_is_refused_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*IMPORTS_CLI, "serve", "--model", "reference", "--port", str(port)], capture_output=True,
                                text=True, env=server_env(), timeout=120)
    assert_one_line_refusal(result, f"port {port}", "already in use")
    assert "listening" not in result.stderr
    assert result.stderr.splitlines()[-1] == "imported:"  # no model load: torch and diffusers are not even imported


@pytest.mark.parametrize(("args", "needles"), [
    pytest.param(["--model", "reference", "--precision", "fp16"], ["fp16 needs a CUDA device"], id="fp16-on-cpu"),
    pytest.param(["--model", "reference", "--height", "33"], ["height 33 does not fit model reference"], id="size"),
    pytest.param(["--engines", "{bundle}", "--height", "64"], ["--height cannot be used with --engines"], id="engines-height"),
    pytest.param(["--engines", "{bundle}", "--precision", "bf16"], ["--precision cannot be used with --engines"],
                 id="engines-precision"),
    pytest.param(["--model", "reference", "--metrics-auth"], ["--metrics-auth needs an API key"], id="metrics-auth-no-key"),
    pytest.param(["--model", "reference", "--api-key-file", "{bundle}/no-such-file"], ["cannot read the API key file"],
                 id="key-file-missing"),
    pytest.param(["--model", "reference", "--api-key-file", "/dev/zero"],
                 ["the API key file /dev/zero is not a regular file"], id="key-file-endless"),
    pytest.param(["--model", "reference", "--bundle-key-file", "{bundle}/manifest.json"], ["use it with --engines"],
                 id="bundle-key-without-engines"),
    pytest.param(["--engines", "{broken}"], ["not a valid catrt manifest"], id="manifest-not-json"),
    pytest.param(["--model", "reference", "--device", "cuda"], ["no CUDA device"], id="no-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_a_mistake_is_refused_in_one_line_before_anything_loads(
    bundle: Path, tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    filled = [arg.format(bundle=bundle, broken=broken) for arg in args]
    result = run_cli(["serve", *filled, "--port", "0"])
    assert_one_line_refusal(result, *needles)


def test_failures_while_loading_are_one_line_and_exit_2(bundle: Path, key_files: dict[str, Path], tmp_path: Path) -> None:
    """Refusals the worker meets while loading (after "listening"): catrt's own, and any other error."""
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    cases = {
        "a catrt error (a wrong bundle key)": (["--engines", str(bundle), "--bundle-key-file", str(key_files["wrong"])],
                                               ["signature does not match the bundle key"]),
        "any other error (a model folder without its files)": (["--model", str(tmp_path), *FAST],
                                                               ["could not load the model", "OSError"]),
    }
    processes = {
        name: subprocess.Popen([*CLI, "serve", *args, "--port", "0"], env=server_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (args, _) in cases.items()
    }
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=180)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert_one_line_refusal(result, *cases[name][1])


def test_a_published_model_offline_is_the_only_line_on_stderr() -> None:
    """diffusers logs "Couldn't connect to the Hub ... Will try to load from local cache." while the worker loads;
    the refusal already says what to do, so that notice stays out of serve's stderr as it does of generate's."""
    result = run_cli(["serve", "--model", "sd3", "--port", "0"])
    line = assert_one_line_refusal(result, "model sd3 (stabilityai/stable-diffusion-3-medium-diffusers)", "gated")
    assert [text for text in result.stderr.splitlines() if text.strip() and not LISTENING.match(text)] == [line]


def test_the_cli_help_of_serve_is_quick() -> None:
    """Quick as it imports neither torch nor diffusers (seconds each)."""
    result = subprocess.run([*IMPORTS_CLI, "serve", "--help"], capture_output=True, text=True, env=server_env(), timeout=120)
    assert result.returncode == 0 and "--api-key-file" in result.stdout and "--max-body-bytes" in result.stdout
    assert result.stderr.splitlines() == ["imported:"]


def test_a_served_model_keeps_prompts_out_of_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers logs the part of a prompt past CLIP's 77 tokens on every call; a server must not write its users'
    prompts into its log. The same call on the plain pipeline does log it (the check can fail)."""
    import logging

    from catrt.config import CATConfig
    from catrt.serve.config import ServeConfig
    from catrt.serve.model import BatchOptions, Row, load_served_model
    from catrt.tiny import build_tiny_pipeline

    prompt = " ".join(f"secret{index}" for index in range(30))  # over 77 CLIP tokens, within the T5 limit
    plain = build_tiny_pipeline("tiny-sd3")
    plain.set_progress_bar_config(disable=True)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    pipeline_logger = logging.getLogger(type(plain).__module__)  # where diffusers logs it
    monkeypatch.setattr(pipeline_logger, "filters", [])  # as in a fresh process: no server loaded in this one yet
    pipeline_logger.addHandler(handler)
    try:
        plain(prompt, num_inference_steps=1, height=32, width=32, output_type="latent")
        assert any("secret" in message for message in records)
        records.clear()
        served = load_served_model(ServeConfig(model="tiny-sd3", height=32, width=32, steps=4, cat=CATConfig(t0=2)))
        served.reader.check("prompt", prompt)
        generation = served.generate([Row(prompt, 0)], BatchOptions(guidance_scale=5.0, negative_prompt=None))
    finally:
        pipeline_logger.removeHandler(handler)
    assert len(generation.images) == 1
    assert not any("secret" in message for message in records), records


def test_an_eager_model_without_a_card_refuses_a_size_it_cannot_take_by_name() -> None:
    """A tiny model's limits are known once loaded: the server names the flag and a size that works, not diffusers'
    ValueError ("You can use height 0") behind "could not load the model"."""
    from catrt.config import CATConfig
    from catrt.errors import ConfigError
    from catrt.serve.config import ServeConfig
    from catrt.serve.model import load_served_model

    with pytest.raises(ConfigError, match="width 17 does not fit model tiny-sd3, which takes multiples of 16 .*try width 16"):
        load_served_model(ServeConfig(model="tiny-sd3", height=32, width=17, steps=4, cat=CATConfig(t0=2)))


def test_a_flux_server_refuses_a_negative_prompt_it_would_ignore_before_queueing_it() -> None:
    """FLUX reads no negative prompt without true CFG: the request was queued, then failed with a logged traceback."""
    from catrt.config import CATConfig
    from catrt.errors import ConfigError
    from catrt.serve.config import ServeConfig
    from catrt.serve.model import load_served_model
    from catrt.serve.schemas import ImageGenerationRequest
    from catrt.serve.validation import RequestRules

    flux = RequestRules(load_served_model(ServeConfig(model="tiny-flux", height=32, width=32, steps=4, cat=CATConfig(t0=2))), 100)
    with pytest.raises(ConfigError, match="negative_prompt is unused by this model: its guidance is distilled") as caught:
        flux.admit(ImageGenerationRequest(prompt="a red circle", negative_prompt="blurry"))
    assert caught.value.field == "negative_prompt"
    assert flux.admit(ImageGenerationRequest(prompt="a red circle", negative_prompt=""))[1].negative_prompt == ""
    sd3 = RequestRules(load_served_model(ServeConfig(model="tiny-sd3", height=32, width=32, steps=4, cat=CATConfig(t0=2))), 100)
    assert sd3.admit(ImageGenerationRequest(prompt="a red circle", negative_prompt="blurry"))[1].negative_prompt == "blurry"


def test_the_openapi_negative_prompt_of_a_flux_server_is_blank_only_as_it_serves() -> None:
    """The document gave a distilled-guidance model's negative_prompt the pattern of one that reads it, so a
    schema-driven client's "blurry" was valid by the document and a 400 at admission: now each text the document
    takes is one the server admits, and each it refuses is refused."""
    import re

    from catrt.config import CATConfig
    from catrt.errors import ConfigError
    from catrt.serve.config import ServeConfig
    from catrt.serve.model import load_served_model
    from catrt.serve.schemas import ImageGenerationRequest
    from catrt.serve.validation import RequestRules

    texts = ["", " ", " \t\n", "\u3000\u00a0", "blurry", " a ", "\u200b", "a\u0089b"]
    for model, expected in (("tiny-flux", [True, True, True, True, False, False, False, False]),
                            ("tiny-sd3", [True, True, True, True, True, True, True, False])):
        rules = RequestRules(load_served_model(ServeConfig(model=model, height=32, width=32, steps=4, cat=CATConfig(t0=2))), 100)
        pattern = re.compile(rules.properties()["negative_prompt"]["anyOf"][0]["pattern"])
        documented = [bool(pattern.search(text)) for text in texts]
        admitted = []
        for text in texts:
            try:
                rules.admit(ImageGenerationRequest(prompt="a red circle", negative_prompt=text))
                admitted.append(True)
            except ConfigError as error:
                assert error.field == "negative_prompt", error
                admitted.append(False)
        assert documented == admitted == expected, (model, documented, admitted)
