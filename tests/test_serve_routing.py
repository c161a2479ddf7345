"""Several builds behind one server (`catrt serve --engines A B`): routing by size, shared components.

Two eager builds of tiny-sd3 (64x64 batch 2, 96x64 batch 1; eager builds are quick: no export) are
made once for the module; one real server (`FAULT_CLI`: its worker holds a call on cue) serves both on a
loopback port.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image
from test_serve_support import (
    FAULT_CLI,
    HeldWorker,
    RemoteServer,
    assert_error,
    assert_one_line_refusal,
    generate,
    metric,
    openapi_request_schema,
    png,
    queue_depth,
    run_cli,
    start_all,
    stop_all,
    wait_until,
)

from catrt.build import build_engines
from catrt.build_config import BuildConfig
from catrt.config import CATConfig
from catrt.errors import ConfigError
from catrt.serve.model import BatchOptions, Row
from catrt.serve.builds import check_builds
from catrt.serve.routing import Router, load_builds

pytestmark = pytest.mark.timeout(300)


def _build(root: Path, **fields: object) -> Path:
    values = dict(model="tiny-sd3", height=64, width=64, batch=1, steps=8, t0=4, alphas=(0.3,), backend="eager",
                  max_sequence_length=16)
    values.update(fields)
    return build_engines(BuildConfig(**values), out_dir=root / "engines", export_dir=root / "export", progress=False)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("routing")
    return {
        "64x64": _build(root, batch=2),
        "96x64": _build(root, width=96),
        "64x64-other-steps": _build(root, steps=6),
        "pixart": _build(root, model="tiny-pixart"),
        "96x64-alphas": _build(root, width=96, alphas=(0.5, 0.2)),
    }


@pytest.fixture(scope="module")
def server(builds: dict[str, Path]) -> Iterator[RemoteServer]:
    started = {"two": RemoteServer(FAULT_CLI, ["--engines", str(builds["64x64"]), str(builds["96x64"]), "--timeout", "60"])}
    start_all(started)
    yield started["two"]
    stop_all(started)


def test_builds_of_one_model_share_one_pipeline_and_time_their_own_steps(builds: dict[str, Path]) -> None:
    square, wide = load_builds([str(builds["64x64"]), str(builds["96x64"])])
    assert (square.spec.size, wide.spec.size) == ("64x64", "96x64")
    for name in ("text_encoder", "text_encoder_3", "tokenizer_3", "vae", "transformer"):
        assert getattr(square.runner.pipe, name) is getattr(wide.runner.pipe, name), name
    # Both timers hook the one transformer; each records its own build's calls only.
    square.generate([Row("a red sun", 0)], BatchOptions(4.0, None, "64x64"))
    wide.generate([Row("a red sun", 0)], BatchOptions(4.0, None, "96x64"))
    assert len(square.timer.durations) == len(wide.timer.durations) == 8
    assert square.timer.last_end < wide.timer.first_start


def test_load_refuses_a_shared_pipeline_that_does_not_fit_the_build(builds: dict[str, Path]) -> None:
    from catrt.bundle import load
    from catrt.loading import load_pipeline

    weightless = load_pipeline("tiny-sd3", transformer_weights=False)
    with pytest.raises(ConfigError, match="has transformer weights none, the eager build needs loaded") as error:
        load(builds["64x64"], pipe=weightless)
    assert error.value.field == "pipe"
    half = load_pipeline("tiny-sd3", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="has dtype torch.bfloat16, the eager build needs torch.float32"):
        load(builds["64x64"], pipe=half)


def test_each_size_takes_and_documents_its_own_alphas_and_batch(builds: dict[str, Path]) -> None:
    """Builds of one model may serve other alphas per size: a pin is checked against its size's build, and the
    OpenAPI document lists every served alpha and which size serves it (it listed the first build's only)."""
    from catrt.serve.routing import RoutedRules
    from catrt.serve.schemas import ImageGenerationRequest

    rules = RoutedRules(Router(load_builds([str(builds["64x64"]), str(builds["96x64-alphas"])])), 4000)
    alpha = rules.properties()["alpha"]
    assert alpha["anyOf"][0]["enum"] == [0.3, 0.5, 0.2]
    assert "64x64: 0.3; 96x64: 0.5, 0.2" in alpha["description"]
    assert rules.admit(ImageGenerationRequest(prompt="a red sun", size="96x64", alpha=0.2))[1].alpha == 0.2
    with pytest.raises(ConfigError, match="alpha=0.3 is not served: this server serves alpha 0.5, 0.2") as pinned:
        rules.admit(ImageGenerationRequest(prompt="a red sun", size="96x64", alpha=0.3))
    assert pinned.value.field == "alpha"
    with pytest.raises(ConfigError, match=r"1 to 1 images per request \(its batch\) at size 96x64") as n:
        rules.admit(ImageGenerationRequest(prompt="a red sun", size="96x64", n=2))
    assert n.value.field == "n"


def test_the_document_takes_only_what_each_sizes_build_serves(builds: dict[str, Path]) -> None:
    """The properties state the union of the builds (`n` up to 2, alphas 0.3, 0.5, 0.2), so `n: 2` at the
    batch-1 size or alpha 0.3 there was a request the document took and the server refused; the request's
    `anyOf` holds each size's own values, and the document and `admit` now agree."""
    import jsonschema

    from catrt.serve.routing import RoutedRules
    from catrt.serve.schemas import ImageGenerationRequest

    rules = RoutedRules(Router(load_builds([str(builds["64x64"]), str(builds["96x64-alphas"])])), 4000)
    document = {"type": "object", "properties": rules.properties(), "anyOf": rules.size_rules()}
    bodies = [
        {"n": 2}, {"n": 2, "size": "auto"}, {"n": 2, "size": "64x64", "alpha": 0.3}, {"size": "96x64", "alpha": 0.2},
        {"size": "96x64", "n": 2}, {"size": "96x64", "alpha": 0.3}, {"size": "64x64", "alpha": 0.5}, {"alpha": 0.2},
    ]
    for fields in bodies:
        body = {"prompt": "a red sun", **fields}
        valid = jsonschema.Draft202012Validator(document).is_valid(body)
        try:
            rules.admit(ImageGenerationRequest(**body))
            admitted = True
        except ConfigError:
            admitted = False
        assert (valid, admitted) == (admitted, admitted), body
        assert valid == (fields in bodies[:4]), body
    same = RoutedRules(Router(load_builds([str(builds["64x64"]), str(builds["96x64"])])), 4000)
    assert same.size_rules() is not None  # batch 2 and 1: the sizes differ
    assert RoutedRules(Router(load_builds([str(builds["96x64"])])), 4000).size_rules() is None


def test_each_size_states_and_applies_its_own_text_length(builds: dict[str, Path], tmp_path: Path) -> None:
    """Builds may take other text lengths (--max-sequence-length): the OpenAPI document stated the first build's
    token limit for every size."""
    from catrt.serve.routing import RoutedRules
    from catrt.serve.schemas import ImageGenerationRequest

    longer = _build(tmp_path, width=128, max_sequence_length=77)
    rules = RoutedRules(Router(load_builds([str(builds["64x64"]), str(longer)])), 4000)
    properties = rules.properties()
    assert "at most the size's build's tokens (64x64: 16, 128x64: 77)" in properties["prompt"]["description"]
    assert "16 tokens" not in properties["prompt"]["description"]
    assert properties["negative_prompt"]["description"] == "same limits as prompt (tokens by size: 64x64: 16, 128x64: 77)"
    prompt = " ".join(["red"] * 30)
    assert rules.admit(ImageGenerationRequest(prompt=prompt, size="128x64"))[0][0].prompt == prompt
    with pytest.raises(ConfigError) as caught:
        rules.admit(ImageGenerationRequest(prompt=prompt, size="64x64"))
    assert caught.value.field == "prompt"


def test_the_router_names_the_served_sizes(builds: dict[str, Path]) -> None:
    class Model:
        def __init__(self, size: str) -> None:
            self.spec = type("Spec", (), {"size": size, "batch": 1})()

    router = Router([Model("64x64"), Model("96x64")])
    assert router.route(None) is router.route("auto") is router.route("64x64") is router.default
    assert router.route("96x64").spec.size == "96x64"
    with pytest.raises(ConfigError, match=r'size=128x128 is not served: this server serves 64x64, 96x64 \("auto" = 64x64\)') as error:
        router.route("128x128")
    assert error.value.field == "size"
    with pytest.raises(ConfigError, match="size must be \"WxH\"") as malformed:
        router.route("wide")
    assert malformed.value.field == "size"
    with pytest.raises(ConfigError, match="two builds serve size 64x64"):
        Router([Model("64x64"), Model("64x64")])


def test_builds_of_other_models_or_one_size_twice_are_refused(builds: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="must all be builds of one model") as models:
        check_builds([str(builds["64x64"]), str(builds["pixart"])])
    assert str(builds["pixart"]) in str(models.value) and "tiny-pixart" in str(models.value)
    with pytest.raises(ConfigError, match="both serve size 64x64") as sizes:
        check_builds([str(builds["64x64"]), str(builds["64x64-other-steps"])])
    assert str(builds["64x64-other-steps"]) in str(sizes.value)


def test_a_build_of_more_alphas_than_the_runtime_keeps_graphs_of_is_refused(tmp_path: Path) -> None:
    """A bundle of nine alphas served a call at one by dropping and remaking another's pruned graphs, at every call in
    turn (the runtime keeps those of MAX_KEPT_ALPHAS per shape). `catrt build` refuses such a bundle now; one built
    before it did is made here with the build's limit lifted."""
    from catrt import build as build_module
    from catrt.checks import MAX_KEPT_ALPHAS

    alphas = tuple(round(0.9 - 0.1 * index, 1) for index in range(MAX_KEPT_ALPHAS + 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "MAX_KEPT_ALPHAS", MAX_KEPT_ALPHAS + 1)
        nine = _build(tmp_path, model="reference", height=32, width=32, steps=4, t0=2, alphas=alphas,
                      max_sequence_length=None)
    eight = _build(tmp_path, model="reference", height=32, width=32, steps=4, t0=2, alphas=alphas[:-1],
                   max_sequence_length=None)
    with pytest.raises(ConfigError, match=r"is built for 9 alphas; a server serves at most 8 .* at most 8 --alpha") as refused:
        check_builds([str(nine)])
    assert refused.value.field == "engines" and str(nine) in str(refused.value)
    assert check_builds([str(eight)])[0].alphas == alphas[:-1]


def test_the_cli_refuses_one_folder_twice_in_one_line(builds: dict[str, Path]) -> None:
    """(Builds of two models or one size twice are refused by `check_builds`, above, which `catrt serve` runs
    before binding its port; those CLI runs cost a torch import each.)"""
    result = run_cli(["serve", "--engines", str(builds["64x64"]), str(builds["64x64"]), "--port", "0"])
    assert_one_line_refusal(result, "more than once", str(builds["64x64"]))
    assert "listening" not in result.stderr


def test_adaptive_alpha_over_a_single_alpha_build_is_refused_before_binding(builds: dict[str, Path]) -> None:
    """It was refused only after every build had loaded and warmed up."""
    result = run_cli(["serve", "--engines", str(builds["96x64-alphas"]), str(builds["64x64"]), "--alpha-policy", "adaptive",
                      "--latency-target", "2", "--port", "0"])
    assert_one_line_refusal(result, "--alpha-policy adaptive needs at least two alphas to choose from, but "
                            f"{builds['64x64']} (tiny-sd3 at 64x64) is served at alpha 0.3 only")
    assert "listening" not in result.stderr


def test_each_size_is_served_by_its_build(server: RemoteServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    for size, expected in (("64x64", (64, 64)), ("96x64", (96, 64)), ("auto", (64, 64))):
        result = client.images.generate(prompt="a red sun", size=size, extra_body={"seed": 3})
        with Image.open(io.BytesIO(png(result.data[0].b64_json))) as image:
            assert image.size == expected, size
        assert result.size == f"{expected[0]}x{expected[1]}"
    assert httpx.get(f"{server.url}/health/ready").json() == {"status": "ready", "sizes": ["64x64", "96x64"]}


def test_an_unserved_size_lists_the_served_ones(server: RemoteServer) -> None:
    error = assert_error(generate(server.url, size="128x128"), 400, "size")
    assert "this server serves 64x64, 96x64" in error["message"]
    assert_error(generate(server.url, size="96x64", n=2), 400, "n")  # the 96x64 build's batch is 1
    assert generate(server.url, size="64x64", n=2).status_code == 200


def test_sizes_are_never_batched_together(server: RemoteServer) -> None:
    """While the worker is busy, two 64x64 requests wait together and one 96x64 request waits apart."""
    bodies = [{"size": "64x64", "seed": 2}, {"size": "96x64", "seed": 3}, {"size": "64x64", "seed": 4}]
    with ThreadPoolExecutor(len(bodies)) as pool, HeldWorker(server, size="96x64", seed=1) as held:
        waiting = [pool.submit(generate, server.url, **body) for body in bodies]
        wait_until(lambda: queue_depth(server.url) == len(bodies), "every request waits behind the held one")
        blocker = held.release()
        square, wide, square2 = (answer.result() for answer in waiting)
    for response in (blocker, square, wide, square2):
        assert response.status_code == 200, response.text
    assert square.json()["catrt"]["batch_rows"] == square2.json()["catrt"]["batch_rows"] == 2
    assert wide.json()["catrt"]["batch_rows"] == 1 and wide.json()["size"] == "96x64"


def test_openapi_and_metrics_cover_every_build(server: RemoteServer) -> None:
    first = {name: schema.get("anyOf", [schema])[0] for name, schema in openapi_request_schema(server.url)["properties"].items()}
    assert first["size"]["enum"] == ["64x64", "96x64", "auto"]
    assert first["n"]["maximum"] == 2 and first["steps"]["enum"] == [8]
    # ... and per size what its build takes: n up to 2 at 64x64 (and "auto"), 1 at 96x64.
    alternatives = openapi_request_schema(server.url)["anyOf"]
    assert [(rule["properties"]["size"]["enum"], rule["properties"]["n"]["anyOf"][0]["maximum"]) for rule in alternatives] == [
        (["64x64", "auto", None], 2), (["96x64"], 1)]
    for size in ("64x64", "96x64"):  # each build: 8 steps, t0 = 4, so 4 full and 4 pruned steps a generation
        series = [f'catrt_images_generated_total{{size="{size}"}}',
                  *(f'catrt_step_seconds_count{{kind="{kind}",size="{size}"}}' for kind in ("full", "pruned"))]
        before = [metric(server.url, name) for name in series]
        assert generate(server.url, size=size).status_code == 200
        assert [metric(server.url, name) for name in series] == [before[0] + 1, before[1] + 4, before[2] + 4]


def test_metrics_count_the_queue_per_size(server: RemoteServer) -> None:
    """The queue is shared by the builds; /metrics had its total only, not what waits for each size."""
    def depths() -> dict[str, float]:
        return {size: metric(server.url, f'catrt_queue_depth_by_size{{size="{size}"}}') for size in ("64x64", "96x64")}

    assert 'catrt_queue_depth_by_size{size="96x64"} 0.0' in httpx.get(f"{server.url}/metrics").text

    bodies = [{"size": "64x64", "seed": 2}, {"size": "64x64", "seed": 3, "guidance_scale": 5.0}, {"size": "96x64", "seed": 4}]

    def all_waiting() -> dict[str, float] | None:  # while the worker is held the queue only grows
        found = depths()
        return found if sum(found.values()) == len(bodies) else None

    with ThreadPoolExecutor(len(bodies)) as pool, HeldWorker(server, size="96x64", seed=1) as held:
        sent = [pool.submit(generate, server.url, **body) for body in bodies]
        waiting = wait_until(all_waiting, "three requests wait behind the held one")
        responses = [held.release(), *(answer.result() for answer in sent)]
    assert all(response.status_code == 200 for response in responses), [response.text for response in responses]
    assert waiting == {"64x64": 2, "96x64": 1}
    assert depths() == {"64x64": 0, "96x64": 0}


@pytest.mark.parametrize("name", ["/models/reference-saved/", "org/model", "tiny-sd3"])
def test_the_sdk_retrieves_the_model_id_it_lists(name: str) -> None:
    """A folder given as `DIR/` was listed with its slash, which the gate drops from the path: retrieve was a 404."""
    from fastapi.testclient import TestClient

    from catrt.serve.app import base_app
    from catrt.serve.config import ServeConfig
    from catrt.serve.metrics import ServerMetrics

    with TestClient(base_app(ServerMetrics(), ServeConfig(model=name))) as http:
        client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http)
        (listed,) = client.models.list().data
        assert listed.id == name.rstrip("/")
        assert client.models.retrieve(listed.id).id == listed.id
        with pytest.raises(openai.NotFoundError, match="is not served here"):
            client.models.retrieve("another-model")


def test_one_folder_spelled_twice_is_named_as_one_folder(tmp_path: Path) -> None:
    """`DIR` and `DIR/` (or a link to DIR) were refused as two builds serving one size."""
    from catrt.serve.config import ServeConfig

    folder = tmp_path / "build"
    folder.mkdir()
    (tmp_path / "link").symlink_to(folder)
    for twice in ((str(folder), f"{folder}/"), (str(folder), str(tmp_path / "link")), ("b", "./b")):
        with pytest.raises(ConfigError, match=r"--engines names one folder twice, as .* give it once") as caught:
            ServeConfig(engines=twice)
        assert caught.value.field == "engines"
    ServeConfig(engines=(str(folder), str(tmp_path / "other")))


def test_pruning_settings_for_served_builds_are_refused_not_ignored() -> None:
    """ServeConfig.cat is the eager model's: builds serve their own schedule, so a cat given with engines went unread."""
    from catrt.serve.config import ServeConfig

    assert ServeConfig(engines="build", cat=CATConfig()).cat == CATConfig()
    for cat in (CATConfig(reuse_every=3), CATConfig(rule="random"), CATConfig(t0=4)):
        with pytest.raises(ConfigError, match=r"ServeConfig.cat sets the pruning of an eager model") as caught:
            ServeConfig(engines="build", cat=cat)
        assert caught.value.field == "cat"
    with pytest.raises(ConfigError, match="the server runs static schedules"):  # the baseline is named first
        ServeConfig(engines="build", cat=CATConfig(reuse_threshold=0.1))


def test_engine_folders_given_as_paths_are_served_as_strings(tmp_path: Path) -> None:
    """`build_engines` returns a Path: `ServeConfig(engines=path)` raised TypeError ('PosixPath' object is not iterable),
    and a tuple of Paths stayed Paths, whose settings (a Ray replica's, `to_dict`) no JSON writer took."""
    import json

    from catrt.serve.config import ServeConfig

    one, two = tmp_path / "a", tmp_path / "b"
    assert ServeConfig(engines=one).engines == (str(one),)
    config = ServeConfig(engines=(one, str(two)))
    assert config.engines == (str(one), str(two))
    assert ServeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for wrong in (5, [3], (one, None), [b"a"]):
        with pytest.raises(ConfigError, match=r"^--engines takes engine folder paths \(catrt build\)$") as caught:
            ServeConfig(engines=wrong)
        assert caught.value.field == "engines"
