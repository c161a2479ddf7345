"""`catrt serve` against what clients send besides a clean JSON request: encodings, media types,
odd paths and methods, the model list, header tricks, wrong-typed fields.

Two servers run for the module, both of the reference model (fast): one with an API key and a small
`--max-body-bytes`, so the body limit's edges and the key's header forms are cheap to reach; one
whose request checks are patched in its own process to take a while on marked prompts, to fill the
line of requests waiting for their checks.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import socket
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from test_serve_support import (
    CLI,
    PROMPT,
    WAIT_SECONDS,
    LiveProbe,
    RemoteServer,
    assert_error,
    png,
    start_all,
    stop_all,
    wait_until,
)

from catrt.errors import shorten
from catrt.serve.schemas import ImageGenerationRequest

KEY = "attack-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 3000
BODY = {"prompt": PROMPT, "seed": 3}
HELD = 70  # requests whose checks are held; the server lets 64 wait for their checks
# The held-check server: checking a prompt that starts with "hold" waits for SIGUSR1 (at most 300 s: a bound against
# a hang only, since the test signals once the flood's refusals came).
HOLD_LAUNCHER = """
import signal, sys, threading
from catrt.serve.routing import RoutedRules
released = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: released.set())
admit = RoutedRules.admit
def held(self, body):
    if body.prompt.startswith("hold"):
        released.wait(300)
    return admit(self, body)
RoutedRules.admit = held
from catrt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RemoteServer]]:
    key_file = tmp_path_factory.mktemp("attack") / "key"
    key_file.write_text(KEY)
    fast = ["--model", "reference", "--steps", "3", "--t0", "2", "--batch", "1"]
    started = {
        "keyed": RemoteServer(CLI, [*fast, "--api-key-file", str(key_file), "--max-body-bytes", str(MAX_BODY)]),
        "held-check": RemoteServer([sys.executable, "-c", HOLD_LAUNCHER], [*fast, "--max-queue", "2"]),
    }
    start_all(started)
    yield started
    stop_all(started)


@pytest.fixture(scope="module")
def server(servers: dict[str, RemoteServer]) -> RemoteServer:
    return servers["keyed"]


@pytest.fixture(scope="module")
def plain_png(server: RemoteServer) -> bytes:
    """The image of `BODY` sent as plain JSON: every decoded form of it must give these bytes."""
    return _image(_post(server, json.dumps(BODY).encode()))


def _post(server: RemoteServer, content: Any, headers: dict[str, str] | None = None,
          path: str = "/v1/images/generations") -> httpx.Response:
    sent = {"content-type": "application/json", **AUTH, **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers={k: v for k, v in sent.items() if v is not None},
                      timeout=60, verify=False)  # plain HTTP: no TLS context to build (0.14 s each here)


def _image(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    return png(response.json()["data"][0]["b64_json"])


def _raw(server: RemoteServer, request: bytes) -> bytes:
    """`request` as sent bytes (for headers httpx will not write twice), the whole answer back."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_SECONDS) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


# -- Content-Encoding ----------------------------------------------------------------------------


def test_gzip_and_deflate_bodies_are_decoded_to_the_same_image(server: RemoteServer, plain_png: bytes) -> None:
    raw = json.dumps(BODY).encode()
    assert _image(_post(server, gzip.compress(raw), {"content-encoding": "gzip"})) == plain_png
    assert _image(_post(server, zlib.compress(raw), {"content-encoding": "deflate"})) == plain_png
    assert _image(_post(server, raw, {"content-encoding": "identity"})) == plain_png


def test_a_gzip_body_of_several_members_is_decoded_as_one(server: RemoteServer, plain_png: bytes) -> None:
    """RFC 1952: a gzip file is members one after another (`gzip -c a b`, pigz); the body is their concatenation."""
    raw = json.dumps(BODY).encode()
    members = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    assert _image(_post(server, members, {"content-encoding": "gzip"})) == plain_png
    bomb = gzip.compress(b'{"prompt": "') + gzip.compress(b"x" * (MAX_BODY - 12)) + gzip.compress(b'"}')
    error = assert_error(_post(server, bomb, {"content-encoding": "gzip"}), 413, None)  # the limit holds over all members
    assert f"decodes past {MAX_BODY} bytes" in error["message"]


def test_a_body_that_inflates_past_the_limit_is_a_413(server: RemoteServer) -> None:
    bomb = gzip.compress(b'{"prompt": "' + b"x" * 2_000_000 + b'"}')
    assert len(bomb) < MAX_BODY  # small on the wire, 2 MB inflated
    error = assert_error(_post(server, bomb, {"content-encoding": "gzip"}), 413, None)
    assert f"decodes past {MAX_BODY} bytes" in error["message"]


@pytest.mark.parametrize(("encoding", "content", "status", "needle"), [
    pytest.param("br", b'{"prompt": "a"}', 415, "Content-Encoding 'br' is not served", id="brotli"),
    pytest.param("gzip", b'{"prompt": "a"}', 400, "not valid gzip data", id="not-gzip"),
    pytest.param("gzip", gzip.compress(b'{"prompt": "a red sun"}')[:-6], 400, "not one whole gzip stream", id="cut-short"),
    pytest.param("deflate", gzip.compress(b'{"prompt": "a"}'), 400, "not valid deflate data", id="gzip-as-deflate"),
    pytest.param("gzip", gzip.compress(b'{"prompt": "a"}') + b"garbage", 400, "not one whole gzip stream", id="member-then-garbage"),
    pytest.param("deflate", zlib.compress(b'{"prompt": ') + zlib.compress(b'"a"}'), 400, "not one whole deflate stream",
                 id="two-deflate-streams"),
])
def test_an_encoding_the_server_cannot_undo_is_refused_naming_the_header(
    server: RemoteServer, encoding: str, content: bytes, status: int, needle: str,
) -> None:
    error = assert_error(_post(server, content, {"content-encoding": encoding}), status, "Content-Encoding")
    assert needle in error["message"]


def _with_headers(lines: list[str], content: bytes) -> bytes:
    """A POST to the images route with header `lines` as written (httpx joins repeated ones), closed after."""
    head = ["POST /v1/images/generations HTTP/1.1", "Host: x", f"Authorization: Bearer {KEY}", "Connection: close",
            f"Content-Length: {len(content)}", *lines]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + content


def _answer(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_repeated_content_encoding_lines_are_one_list(server: RemoteServer, plain_png: bytes) -> None:
    """RFC 9110 5.3: two `Content-Encoding: gzip` lines mean `gzip, gzip`, not the last line alone."""
    twice = gzip.compress(gzip.compress(json.dumps(BODY).encode()))
    lines = ["Content-Type: application/json", "Content-Encoding: gzip", "Content-Encoding: gzip"]
    status, answer = _answer(_raw(server, _with_headers(lines, twice)))
    assert status == 200, answer
    assert png(answer["data"][0]["b64_json"]) == plain_png
    status, answer = _answer(_raw(server, _with_headers(lines, gzip.compress(json.dumps(BODY).encode()))))
    assert (status, answer["error"]["param"]) == (400, "Content-Encoding")  # gzip once, where the lines say twice
    assert "not valid gzip data" in answer["error"]["message"]


# -- Content-Type and the body's shape -------------------------------------------------------------


def test_content_type_lines_that_disagree_are_a_400_naming_it(server: RemoteServer, plain_png: bytes) -> None:
    content = json.dumps(BODY).encode()
    for lines in (["Content-Type: application/json", "Content-Type: text/plain"],
                  ["Content-Type: text/plain", "Content-Type: application/json"]):
        status, answer = _answer(_raw(server, _with_headers(lines, content)))
        assert (status, answer["error"]["param"], answer["error"]["code"]) == (400, "Content-Type", "400")
        assert "Content-Type header is sent 2 times with different values" in answer["error"]["message"]
        assert "'text/plain'" in answer["error"]["message"] and "send it once" in answer["error"]["message"]
    status, answer = _answer(_raw(server, _with_headers(["Content-Type: application/json"] * 2, content)))
    assert status == 200 and png(answer["data"][0]["b64_json"]) == plain_png  # the same line twice is one type



@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_json_by_its_content_type_is_a_415(server: RemoteServer, media: str) -> None:
    error = assert_error(_post(server, json.dumps(BODY).encode(), {"content-type": media}), 415, "Content-Type")
    assert f"Content-Type {media!r} is not served" in error["message"]
    assert "application/json" in error["message"]


@pytest.mark.parametrize("media", [None, "application/json; charset=utf-8", "Application/JSON", "application/vnd.catrt+json"])
def test_json_by_any_of_its_names_or_without_a_content_type_is_served(
    server: RemoteServer, plain_png: bytes, media: str | None,
) -> None:
    assert _image(_post(server, json.dumps(BODY).encode(), {"content-type": media})) == plain_png


@pytest.mark.parametrize(("content", "needle"), [
    pytest.param(b"", "the request body is empty", id="empty"),
    pytest.param(b"  \n", "the request body is empty", id="whitespace"),
    pytest.param(b"[1, 2]", "must be one JSON object, not an array", id="array"),
    pytest.param(b'"a red sun"', "must be one JSON object, not a string", id="string"),
    pytest.param(b"5", "must be one JSON object, not a number", id="number"),
    pytest.param(b"null", "must be one JSON object, not null", id="null"),
    pytest.param(b"true", "must be one JSON object, not a boolean", id="boolean"),
])
def test_a_body_that_is_not_one_object_says_what_it_is(server: RemoteServer, content: bytes, needle: str) -> None:
    assert needle in assert_error(_post(server, content), 400, None)["message"]


@pytest.mark.parametrize(("body", "param", "needle"), [
    pytest.param({"n": 1}, "prompt", "prompt is required", id="missing"),
    pytest.param({"prompt": "a", "n": 1.5}, "n", "n: Input should be a valid integer, got 1.5", id="n-float"),
    pytest.param({"prompt": "a", "n": True}, "n", "got true", id="n-bool"),
    pytest.param({"prompt": "a", "alpha": "0.3"}, "alpha", 'got "0.3"', id="alpha-string"),
    pytest.param({"prompt": ["a", "b"]}, "prompt", 'got ["a", "b"]', id="prompt-list"),
    pytest.param({"prompt": "a", "input_fidelity": "high"}, "input_fidelity",
                 "unknown field 'input_fidelity': this endpoint takes prompt, n, size", id="unknown-field"),
    pytest.param({"prompt": "a", "partial_images": 2}, "partial_images",
                 "partial_images=2 is not served: partial images come only with streaming", id="partial-images"),
])
def test_a_wrong_field_is_named_with_what_was_sent(server: RemoteServer, body: dict[str, Any], param: str, needle: str) -> None:
    assert needle in assert_error(_post(server, json.dumps(body).encode()), 400, param)["message"]


def test_an_integer_written_with_a_zero_fraction_is_that_integer(server: RemoteServer, plain_png: bytes) -> None:
    """JSON Schema's "integer" (what the OpenAPI document states for n, seed, steps...) takes 3.0, and a
    schema-driven client sends it: it is served as 3; 3.5, "3" and true stay refused by name."""
    body = b'{"prompt": "%s", "seed": 3.0, "n": 1.0, "steps": 3.0, "output_compression": 26.0}' % PROMPT.encode()
    assert _image(_post(server, body)) == plain_png
    assert "got 3.5" in assert_error(_post(server, json.dumps({**BODY, "seed": 3.5}).encode()), 400, "seed")["message"]


def test_an_integer_is_the_one_written_past_what_a_float_holds(server: RemoteServer) -> None:
    """Python's parser reads 9007199254740993.0 as the float 2**53: the seed was served as 2**53, a seed nobody
    sent. It is 2**53 + 1, as the integer 9007199254740993 is; a fraction its float rounds away is refused."""
    def seed_image(seed: str) -> bytes:
        return _image(_post(server, b'{"prompt": "%s", "seed": %s}' % (PROMPT.encode(), seed.encode())))

    odd = seed_image("9007199254740993")
    assert seed_image("9007199254740993.0") == seed_image("9007199254740993e0") == odd
    assert seed_image("9007199254740992") != odd  # the generator takes the seed whole: 2**53 draws another image
    for written in ("4503599627370497.5", "0.99999999999999999999"):  # floats 4503599627370498.0 and 1.0
        body = b'{"prompt": "%s", "seed": %s}' % (PROMPT.encode(), written.encode())
        message = assert_error(_post(server, body), 400, "seed")["message"]
        assert message == f"seed: Input should be a valid integer, got {written}", message


def test_a_body_exactly_at_the_limit_is_served_one_byte_over_is_a_413(server: RemoteServer, plain_png: bytes) -> None:
    base = json.dumps({**BODY, "user": ""}).encode()
    at_limit = json.dumps({**BODY, "user": "u" * (MAX_BODY - len(base))}).encode()
    assert len(at_limit) == MAX_BODY
    assert _image(_post(server, at_limit)) == plain_png
    assert _image(_post(server, iter([at_limit[:1000], at_limit[1000:]]))) == plain_png  # chunked
    over = json.dumps({**BODY, "user": "u" * (MAX_BODY - len(base) + 1)}).encode()
    assert f"is {MAX_BODY + 1} bytes" in assert_error(_post(server, over), 413, None)["message"]


# -- paths and methods --------------------------------------------------------------------------


def test_a_trailing_slash_is_served_not_redirected(server: RemoteServer, plain_png: bytes) -> None:
    assert _image(_post(server, json.dumps(BODY).encode(), path="/v1/images/generations/")) == plain_png
    assert httpx.get(f"{server.url}/health/live/").status_code == 200


def test_a_request_line_naming_the_whole_url_is_served_as_its_path(server: RemoteServer, plain_png: bytes) -> None:
    """RFC 9112 3.2.2: a server takes the absolute form (`POST http://host/path`), as clients write it to a proxy."""
    content = json.dumps(BODY).encode()
    request = (f"POST {server.url}/v1/images/generations?x=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Connection: close\r\nContent-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n").encode()
    status, answer = _answer(_raw(server, request + content))
    assert status == 200 and png(answer["data"][0]["b64_json"]) == plain_png
    for target, status in ((f"HTTPS://{KEY}@example.com:1/v1/models/", 200), ("http://example.com", 404)):
        request = f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
        got, answer = _answer(_raw(server, request.encode()))
        assert got == status, answer
    assert answer["error"]["message"].startswith("Invalid URL (GET /): ")


def test_a_request_line_naming_the_whole_url_still_needs_the_key(server: RemoteServer) -> None:
    """The key is asked for on the path the URL names, as on the path alone."""
    content = json.dumps(BODY).encode()
    request = (b"POST http://catrt.example:8000/v1/images/generations/ HTTP/1.1\r\nHost: catrt.example:8000\r\n"
               b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(content))
    status, answer = _answer(_raw(server, request + content))
    assert (status, answer["error"]["code"]) == (401, "401"), answer


@pytest.mark.parametrize("target", [b"health/live", b"v1/images/generations"])
def test_a_target_that_is_not_a_path_is_a_400_saying_so(server: RemoteServer, target: bytes) -> None:
    """Not a 404 naming `/health/live` among the routes it says exist, as a path without its '/' was told."""
    answer = _raw(server, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, body = answer.split(b" ", 2)[1], json.loads(answer.partition(b"\r\n\r\n")[2])
    assert (status, body["error"]["param"], body["error"]["code"]) == (b"400", None, "400"), answer
    assert f"the request target '{target.decode()}' is not a path" in body["error"]["message"]


def test_head_answers_as_get_without_a_body(server: RemoteServer) -> None:
    live = httpx.head(f"{server.url}/health/live")
    assert live.status_code == 200 and live.content == b""
    assert int(live.headers["content-length"]) == len(httpx.get(f"{server.url}/health/live").content)
    assert httpx.head(f"{server.url}/v1/models", headers=AUTH).status_code == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
def test_another_method_on_the_images_route_is_a_405_naming_post(server: RemoteServer, method: str) -> None:
    response = httpx.request(method, f"{server.url}/v1/images/generations", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    if method != "HEAD":
        assert "use POST" in assert_error(response, 405, None)["message"]


def test_another_method_on_a_get_route_is_a_405_allowing_get_and_head(server: RemoteServer) -> None:
    """The 405's Allow lists every method the route serves: HEAD is answered wherever GET is."""
    response = httpx.post(f"{server.url}/health/live", headers=AUTH)
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    assert "use GET" in assert_error(response, 405, None)["message"]


def test_an_unknown_path_is_a_404_listing_the_routes(server: RemoteServer) -> None:
    error = assert_error(httpx.post(f"{server.url}/v1/images/edits", headers=AUTH), 404, None)
    assert "Invalid URL (POST /v1/images/edits)" in error["message"]
    assert "POST /v1/images/generations" in error["message"] and "GET /v1/models" in error["message"]


def test_an_upload_to_a_route_the_server_lacks_is_a_404_or_405_not_a_413(server: RemoteServer) -> None:
    """The SDK's images.edit with an image over --max-body-bytes was told its body is too large."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as edit:
        client.images.edit(image=("a.png", b"\x89PNG" + bytes(4 * MAX_BODY), "image/png"), prompt="a red sun")
    assert "Invalid URL (POST /v1/images/edits)" in edit.value.body["message"]
    with pytest.raises(openai.NotFoundError) as variation:
        client.images.create_variation(image=("a.png", b"\x89PNG" + bytes(64), "image/png"))
    assert "Invalid URL (POST /v1/images/variations)" in variation.value.body["message"]
    wrong_method = httpx.put(f"{server.url}/v1/images/generations", content=bytes(4 * MAX_BODY), headers=AUTH)
    assert "use POST" in assert_error(wrong_method, 405, None)["message"]
    assert_error(httpx.request("GET", f"{server.url}/health/live", content=bytes(4 * MAX_BODY)), 413, None)  # a route


# -- the model list, through the OpenAI SDK ------------------------------------------------------


def test_the_sdk_lists_and_retrieves_the_served_model(server: RemoteServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    models = client.models.list()
    assert [model.id for model in models.data] == ["reference"]
    assert models.data[0].owned_by == "catrt"
    assert client.models.retrieve("reference").id == "reference"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("dall-e-3")
    assert missing.value.body["param"] == "model"
    assert "'dall-e-3' is not served here" in missing.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


# -- the API key's header ------------------------------------------------------------------------


def test_the_key_after_a_tab_or_extra_spaces_is_taken(server: RemoteServer) -> None:
    for header in (f"Bearer\t{KEY}", f"BEARER   {KEY}"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("order", [("wrong", KEY), (KEY, "wrong"), (KEY, KEY)])
def test_two_authorization_headers_are_a_401_whichever_comes_last(server: RemoteServer, order: tuple[str, str]) -> None:
    host = server.url.removeprefix("http://")
    request = (f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {order[0]}\r\n"
               f"Authorization: Bearer {order[1]}\r\nConnection: close\r\n\r\n").encode()
    head, _, body = _raw(server, request).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert "several Authorization headers" in json.loads(body)["error"]["message"]


def test_metrics_count_the_refusals_under_their_route(server: RemoteServer) -> None:
    _post(server, b"x", {"content-type": "text/plain"})
    # Counted once the request's handling returned, which may come after its answer was sent.
    wait_until(lambda: _count(server.url, 'catrt_requests_total{route="/v1/images/generations",status="415"}'),
               "the 415 is counted")


def test_the_openapi_document_describes_the_model_list(server: RemoteServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    assert document["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert "/v1/models/{model_id}" in document["paths"]
    assert set(document["components"]["schemas"]["ModelCard"]["properties"]) == {"id", "object", "created", "owned_by"}



# -- a flood of costly checks ------------------------------------------------------------------------


def test_a_flood_waiting_for_its_checks_is_refused_at_once_past_64(servers: dict[str, RemoteServer]) -> None:
    """Prompts are checked (tokenized) one at a time; past max(64, 2 x --max-queue) requests waiting for
    that, more are a 429 with Retry-After at once instead of waiting behind the flood, and the server
    keeps serving."""
    server = servers["held-check"]
    url = server.url

    async def flood() -> list[httpx.Response]:
        # The held requests wait for the refusals of the rest, which may take up to WAIT_SECONDS.
        async with httpx.AsyncClient(timeout=2 * WAIT_SECONDS, limits=httpx.Limits(max_connections=HELD + 10)) as client:
            posts = [asyncio.ensure_future(client.post(f"{url}/v1/images/generations",
                                                       json={"prompt": f"hold {index}", "size": "1x1"}))
                     for index in range(HELD)]
            deadline = time.monotonic() + WAIT_SECONDS  # only a hang reaches it: the loop ends once they came
            while sum(post.done() for post in posts) < HELD - 64 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            early = [post.result().status_code for post in posts if post.done()]
            server.process.send_signal(signal.SIGUSR1)
            answers = await asyncio.gather(*posts)
            assert early == [429] * (HELD - 64), early  # answered while the checks were held
            return answers

    with LiveProbe(url) as probe:
        answers = asyncio.run(flood())
    statuses = sorted(response.status_code for response in answers)
    assert statuses == [400] * 64 + [429] * (HELD - 64), statuses
    for response in answers:
        if response.status_code == 429:
            assert "at most 64 wait for their checks" in assert_error(response, 429, None)["message"]
            assert response.headers["retry-after"] == "1"
        else:  # each held request was checked in the end: the size it asked for is not served
            assert_error(response, 400, "size")
    assert not probe.failures, probe.failures
    assert httpx.post(f"{url}/v1/images/generations", json={"prompt": PROMPT}, timeout=60).status_code == 200


@pytest.mark.parametrize("request_bytes", [
    pytest.param(b"GARBAGE\r\n\r\n", id="no-request-line"),
    pytest.param(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", id="length-not-a-number"),
    pytest.param(b"GET /health/live HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", id="header-without-colon"),
])
def test_a_request_http_cannot_parse_is_a_400_in_the_error_body(server: RemoteServer, request_bytes: bytes) -> None:
    head, _, body = _raw(server, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "400" and error["type"] == "invalid_request_error" and error["param"] is None
    assert "invalid HTTP request" in error["message"]
    assert httpx.get(f"{server.url}/health/live").status_code == 200


@pytest.mark.parametrize(("content", "key"), [
    pytest.param(b'{"prompt": "a red sun", "prompt": "   "}', "prompt", id="prompt"),
    pytest.param(b'{"prompt": "a red sun", "seed": 1, "n": 1, "seed": 2}', "seed", id="seed"),
    pytest.param(b'{"prompt": "a red sun", "user": "u", "User": "v", "user": "w"}', "user", id="case-differs-then-repeats"),
])
def test_a_key_given_twice_is_a_400_naming_it(server: RemoteServer, content: bytes, key: str) -> None:
    """Parsers disagree on which of two equal keys wins (Python's keeps the last), so neither is taken."""
    error = assert_error(_post(server, content), 400, None)
    assert f"the key {key!r} appears twice in one object" in error["message"]
    assert error["message"].endswith("send each field once")  # no parser position: the object parsed whole


@pytest.mark.parametrize(("content", "reason"), [
    pytest.param(b'{"prompt": "a red sun', "Unterminated string starting at character 11 of the body", id="cut-string"),
    pytest.param(b'{"prompt": }', "Expecting value at character 11 of the body", id="no-value"),
    pytest.param(b'{"prompt": "a"} {', "Extra data at character 16 of the body", id="extra-data"),
    pytest.param(b'{"prompt": "a\x01"}', "Invalid control character at character 13 of the body", id="control-char"),
    pytest.param(b'\xef\xbb\xbf{"prompt" "a"}', "Expecting ':' delimiter at character 10 of the body", id="after-a-bom"),
])
def test_json_that_does_not_parse_is_named_with_where_the_parser_stopped(
    server: RemoteServer, content: bytes, reason: str,
) -> None:
    """The parser's reasons that end "at" read cut short without the position it stopped at."""
    assert assert_error(_post(server, content), 400, None)["message"] == f"the body is not valid JSON: {reason}"


def _count(url: str, series: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=WAIT_SECONDS).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_leaves_mid_body_is_counted_499_not_500(server: RemoteServer) -> None:
    route = 'catrt_requests_total{route="/v1/images/generations",status="%s"}'
    before = {status: _count(server.url, route % status) for status in ("499", "500")}
    host, port = server.url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                               + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prom")
            time.sleep(0.1)  # only a chance for the server to read the request first: either way its client left
    wait_until(lambda: _count(server.url, route % "499") >= before["499"] + 3, "the three departures are counted")
    assert _count(server.url, route % "499") == before["499"] + 3
    assert _count(server.url, route % "500") == before["500"]


def test_a_field_name_that_is_not_unicode_text_is_named_as_such(server: RemoteServer) -> None:
    error = assert_error(_post(server, b'{"prompt": "a red sun", "\\ud800": 1}'), 400, None)
    assert 'the field name "\\ud800" is not valid Unicode text' in error["message"]


def test_partial_images_zero_is_taken_as_openai_clients_send_it(server: RemoteServer, plain_png: bytes) -> None:
    assert _image(_post(server, json.dumps({**BODY, "partial_images": 0, "stream": False}).encode())) == plain_png


@pytest.mark.parametrize(("path", "allowed"), [
    ("/v1/images/generations", "POST, OPTIONS"),
    ("/health/live", "GET, HEAD, OPTIONS"),  # HEAD is answered wherever GET is (as `OPTIONS *` lists it)
    ("/v1/models", "GET, HEAD, OPTIONS"),
])
def test_options_answers_204_with_the_allowed_methods(server: RemoteServer, path: str, allowed: str) -> None:
    response = httpx.options(f"{server.url}{path}", headers=AUTH)
    assert response.status_code == 204 and response.content == b""
    assert response.headers["allow"] == allowed


def test_options_star_answers_204_with_every_method_served(server: RemoteServer) -> None:
    """`OPTIONS *` asks about the server as a whole (RFC 9110 9.3.7); `*` for another method is no path."""
    answer = _raw(server, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 204 ") and b"\r\nallow: get, head, post, options" in head, answer
    answer = _raw(server, b"GET * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"the request target '*' is not a path" in answer, answer


def test_a_503_and_a_429_tell_the_client_when_to_retry() -> None:
    from catrt.errors import QueueFullError, ServiceUnavailableError
    from catrt.serve.errors import UNAVAILABLE_RETRY_AFTER, catrt_error_response

    unavailable = catrt_error_response(ServiceUnavailableError("the server is loading; retry later"))
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == str(UNAVAILABLE_RETRY_AFTER)
    assert json.loads(unavailable.body)["error"]["type"] == "service_unavailable_error"
    full = catrt_error_response(QueueFullError("the request queue is full", retry_after=7))
    assert full.status_code == 429 and full.headers["retry-after"] == "7"


def test_an_encoding_header_on_a_request_without_a_body_is_ignored(server: RemoteServer) -> None:
    for encoding in ("gzip", "deflate"):
        assert httpx.get(f"{server.url}/health/live", headers={"content-encoding": encoding}).status_code == 200
    assert "the request body is empty" in assert_error(_post(server, b"", {"content-encoding": "gzip"}), 400, None)["message"]


# -- long values are echoed short ---------------------------------------------------------------

LONG = MAX_BODY - 200  # characters: a value as long as the body limit allows, far past the echo limit


def _assert_short_echo(response: httpx.Response, status: int, param: str | None, sent: str) -> None:
    """OpenAI's body naming `param`, whose message shows only the start and end of `sent`, cut with an ellipsis."""
    from catrt.errors import ECHO_LIMIT

    error = assert_error(response, status, param)
    assert sent[:ECHO_LIMIT] not in error["message"] and "…" in error["message"], error["message"][:300]
    assert len(response.content) < 1000, len(response.content)


@pytest.mark.parametrize("field", ["size", "response_format", "output_format", "background", "quality", "style",
                                   "moderation", "complexity", "n", "seed", "steps", "alpha", "guidance_scale",
                                   "partial_images", "output_compression", "frame_count", "prompt"])
def test_a_huge_bad_value_is_named_by_its_field_and_echoed_short(server: RemoteServer, field: str) -> None:
    """A string where a number goes, or a string no rule takes, of thousands of characters: the 400 names
    the field and shows the value's first characters only (every message echoing a value cuts it)."""
    value: Any = "9" * LONG
    if field in ("n", "seed", "steps", "partial_images", "output_compression", "frame_count"):
        value = int("9" * LONG)  # a JSON number, not a string
    elif field == "prompt":
        value = ["9" * LONG]
    _assert_short_echo(_post(server, json.dumps({**BODY, field: value}).encode()), 400, field, "9" * LONG)


def test_huge_names_headers_and_paths_are_echoed_short(server: RemoteServer) -> None:
    key = "k" * LONG
    _assert_short_echo(_post(server, json.dumps({**BODY, key: 1}).encode()), 400, shorten(key), key)
    half = key[: LONG // 2]
    twice = b'{"prompt": "a", "%s": 1, "%s": 2}' % (half.encode(), half.encode())
    _assert_short_echo(_post(server, twice), 400, None, half)
    media = "application/" + "x" * LONG
    _assert_short_echo(_post(server, json.dumps(BODY).encode(), {"content-type": media}), 415, "Content-Type", media)
    encoding = "z" * LONG
    _assert_short_echo(_post(server, json.dumps(BODY).encode(), {"content-encoding": encoding}), 415,
                       "Content-Encoding", encoding)
    path = "/v1/" + "p" * LONG
    _assert_short_echo(httpx.get(f"{server.url}{path}", headers=AUTH, verify=False), 404, None, path)
    model = "m" * LONG
    _assert_short_echo(httpx.get(f"{server.url}/v1/models/{model}", headers=AUTH, verify=False), 404, "model", model)


# -- fuzzed fields: each a 4xx naming the field, or a documented success ---------------------------

FIELDS = list(ImageGenerationRequest.model_fields)
# Raw JSON no field takes: an array, an object, a boolean, non-finite and out-of-range numbers.
WRONG_FOR_EVERY_FIELD = ["[1]", '{"a": 1}', "true", "NaN", "-Infinity", "1e999", str(-(2**64))]


@pytest.mark.parametrize("field", FIELDS)
def test_no_field_takes_a_value_of_a_kind_it_does_not_serve(server: RemoteServer, field: str) -> None:
    """Every request field (read from the schema, so a new field is fuzzed too) refuses each raw JSON
    value above with a 400 naming it, in OpenAI's body; the server answers the next request."""
    for raw in WRONG_FOR_EVERY_FIELD:
        body = json.dumps({**BODY, field: None}).replace(f'"{field}": null', f'"{field}": {raw}').encode()
        assert_error(_post(server, body), 400, field)
    huge = ["9" * LONG]  # and a value of thousands of characters is echoed short, whichever field it is in
    _assert_short_echo(_post(server, json.dumps({**BODY, field: huge}).encode()), 400, field, json.dumps(huge))
    assert httpx.get(f"{server.url}/health/live", verify=False).status_code == 200


@pytest.mark.parametrize(("fields", "param", "needle"), [
    # OpenAI's own value sets for the fields it defines: another value is a 400, as OpenAI's API answers it.
    pytest.param({"quality": "ultra"}, "quality", "Input should be 'low', 'medium'", id="quality"),
    pytest.param({"style": "anime"}, "style", "Input should be 'vivid' or 'natural'", id="style"),
    pytest.param({"moderation": "off"}, "moderation", "Input should be 'low' or 'auto'", id="moderation"),
    pytest.param({"complexity": "max"}, "complexity", "Input should be 'low', 'medium' or 'high'", id="complexity"),
    pytest.param({"background": "blue"}, "background", "Input should be 'transparent', 'opaque' or 'auto'", id="background"),
    pytest.param({"response_format": "png"}, "response_format", "Input should be 'url' or 'b64_json'", id="response-format"),
    pytest.param({"output_compression": -1}, "output_compression", "greater than or equal to 0", id="compression-negative"),
    pytest.param({"output_compression": 101}, "output_compression", "less than or equal to 100", id="compression-over"),
    pytest.param({"partial_images": -1}, "partial_images", "greater than or equal to 0", id="partial-negative"),
    pytest.param({"partial_images": 4}, "partial_images", "less than or equal to 3", id="partial-over"),
    # ... and values OpenAI takes that this server does not make.
    pytest.param({"output_format": "gif"}, "output_format", "output_format 'gif' is not served", id="gif"),
    pytest.param({"output_format": "svg"}, "output_format", "output_format 'svg' is not served", id="svg-format"),
    pytest.param({"frame_count": 4}, "frame_count", "frames of GIF output, which this server does not make", id="frames"),
    pytest.param({"frame_duration_ms": 100}, "frame_duration_ms", "frame delay of GIF output", id="frame-duration"),
    pytest.param({"svg": {"model": "x"}}, "svg", "how SVG output is written, which this server does not make", id="svg"),
    # Integers are 64-bit: a seed, count or step past that is refused by its type, its message short.
    pytest.param({"seed": 2**63}, "seed", "less than or equal to 9223372036854775807", id="seed-past-int64"),
    pytest.param({"n": -(2**63) - 1}, "n", "greater than or equal to -9223372036854775808", id="n-past-int64"),
    pytest.param({"n": -1}, "n", "n=-1 is not served", id="n-negative"),
    pytest.param({"n": 2}, "n", "n=2 is not served: this server makes 1 to 1 images", id="n-over-batch"),
    pytest.param({"steps": 3.5}, "steps", "Input should be a valid integer, got 3.5", id="steps-float"),
    pytest.param({"seed": "7"}, "seed", 'Input should be a valid integer, got "7"', id="seed-string"),
    pytest.param({"guidance_scale": True}, "guidance_scale", "Input should be a valid number, got true", id="guidance-bool"),
    pytest.param({"prompt": "a\u0000b"}, "prompt", "control character U+0000", id="prompt-nul"),
    pytest.param({"negative_prompt": "\u202e\u0007"}, "negative_prompt", "control character U+0007", id="negative-bell"),
    pytest.param({"prompt": "\u2060\u200b"}, "prompt", "must not be empty or blank", id="prompt-invisible"),
    pytest.param({"size": "1024x"}, "size", "got '1024x'", id="size-no-height"),
    pytest.param({"size": "0x0"}, "size", "got '0x0'", id="size-zero"),
    pytest.param({"size": "-1x-1"}, "size", "got '-1x-1'", id="size-negative"),
    pytest.param({"size": "1e3x1e3"}, "size", "got '1e3x1e3'", id="size-exponent"),
    pytest.param({"size": " 512x512"}, "size", "got ' 512x512'", id="size-leading-space"),
    pytest.param({"size": "32X32"}, "size", "got '32X32'", id="size-capital-x"),
    pytest.param({"size": "AUTO"}, "size", "got 'AUTO'", id="size-auto-capitals"),
    pytest.param({"size": "\uff13\uff12x32"}, "size", "got '\uff13\uff12x32'", id="size-fullwidth-digits"),
    pytest.param({"size": "512x512"}, "size", "size=512x512 is not served", id="size-not-served"),
])
def test_a_value_outside_what_is_served_is_a_400_naming_its_field(
    server: RemoteServer, fields: dict[str, Any], param: str, needle: str,
) -> None:
    error = assert_error(_post(server, json.dumps({**BODY, **fields}).encode()), 400, param)
    assert needle in error["message"], error["message"]


def test_openai_fields_with_openai_values_are_served_or_ignored(server: RemoteServer, plain_png: bytes) -> None:
    """Every value OpenAI defines for the fields this server ignores is taken (the image is the same), and
    a body with every optional field null is the plain request."""
    ignored = {"quality": "xhigh", "style": "natural", "complexity": "high", "moderation": "low",
               "output_compression": 0, "model": "gpt-image-2\u0000", "user": "\ud800", "safety_identifier": ""}
    assert _image(_post(server, json.dumps({**BODY, **ignored}).encode())) == plain_png  # escaped: NUL, a lone surrogate
    nulls = {field: None for field in FIELDS if field not in BODY}
    assert _image(_post(server, json.dumps({**BODY, **nulls}).encode())) == plain_png


@pytest.mark.parametrize(("content", "status", "needle"), [
    pytest.param(json.dumps(BODY).encode("utf-16"), 400, "encoded as UTF-8", id="utf-16"),
    pytest.param(json.dumps(BODY).encode("utf-32"), 400, "encoded as UTF-8", id="utf-32"),
    pytest.param(json.dumps(BODY, ensure_ascii=False).replace("sun", "s\u00fcn").encode("latin-1"), 400,
                 "encoded as UTF-8", id="latin-1"),
    pytest.param(b"\xef\xbb\xbf" + json.dumps(BODY).encode(), 200, None, id="utf-8-with-bom"),
])
def test_a_body_is_read_as_utf8_only(server: RemoteServer, plain_png: bytes, content: bytes, status: int,
                                     needle: str | None) -> None:
    """JSON travels as UTF-8 (RFC 8259; a leading byte order mark is skipped): Python's parser would guess UTF-16."""
    response = _post(server, content)
    if status == 200:
        assert _image(response) == plain_png
    else:
        assert needle in assert_error(response, status, None)["message"]


# -- the body deadline of the Ray Serve ingress (in-process: the gate alone) ------------------------


def _through_gate(body_timeout: float | None, chunks: list[bytes], then_wait: bool) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The messages a `RequestGate` sends for a POST whose body comes as `chunks` (then, if `then_wait`, no
    more: the client stalls); and the bodies the app behind it was handed."""
    from catrt.serve.gate import RequestGate

    handed: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        handed.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def run() -> list[dict[str, Any]]:
        pending = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]
        if not then_wait:
            pending.append({"type": "http.request", "body": b"", "more_body": False})
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop(0)
            await asyncio.sleep(3600)  # a client that sends nothing more
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/images/generations",
                 "headers": [(b"content-type", b"application/json")]}
        gate = RequestGate(app, max_body_bytes=MAX_BODY, json_paths=("/v1/images/generations",), body_timeout=body_timeout)
        await asyncio.wait_for(gate(scope, receive, send), WAIT_SECONDS)  # against a hang only
        return sent

    return asyncio.run(run()), handed


def test_a_body_that_stalls_past_the_body_deadline_is_a_408_that_closes_the_connection() -> None:
    """Ray Serve's proxy has no read deadline: its ingress's gate answers 408 with `Connection: close` (which
    uvicorn honours by closing the connection) to a body not whole within --read-timeout of its headers."""
    sent, handed = _through_gate(0.2, [b'{"prompt": '], then_wait=True)
    start, body = sent
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["type"] == "timeout_error" and error["code"] == "408"
    assert "did not arrive whole within 0.2 s" in error["message"]
    assert handed == []  # the app never saw the request
    sent, handed = _through_gate(0.2, [b'{"prompt": ', b'"a"}'], then_wait=False)  # whole in time: served
    assert sent[0]["status"] == 200 and handed == [b'{"prompt": "a"}']


@pytest.mark.parametrize(("upgrade", "path", "status"), [
    pytest.param(b"Upgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n", "/v1/images/generations", 405, id="websocket"),
    pytest.param(b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings, close\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
                 "/v1/nothing", 404, id="h2c"),
])
def test_an_upgrade_request_is_answered_as_plain_http(server: RemoteServer, upgrade: bytes, path: str, status: int) -> None:
    """No route speaks WebSocket: the handshake is the GET it also is, answered in OpenAI's error body."""
    request = (f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n").encode() + upgrade + b"\r\n"
    head, _, body = _raw(server, request).partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    assert json.loads(body)["error"]["code"] == str(status)


def test_echo_json_escapes_a_value_and_cuts_it_as_catrt_errors_do() -> None:
    from catrt.errors import ECHO_LIMIT, echo
    from catrt.serve.echo import echo_json

    assert echo_json(None) == "null" and echo_json(True) == "true" and echo_json(float("nan")) == "NaN"
    assert echo_json("a\ud800\u00e9") == '"a\\ud800\\u00e9"'  # escaped: safe in a UTF-8 answer and a log line
    assert echo("a\ud800\x00") == "'a\\ud800\\x00'"
    long = echo_json("x" * 10_000)
    assert len(long) == ECHO_LIMIT and long.startswith('"xx') and "…" in long and long.endswith("(10002 characters)")
    assert echo_json(10**5000) == echo(10**5000)  # past Python's digit limit for printing an int: named, not shown
    from catrt.serve.json_numbers import parse_float
    assert echo_json(parse_float("4503599627370497.5")) == "4503599627370497.5"  # as written, not its float's 4503599627370498.0


def test_a_number_whose_exponent_is_past_a_decimals_parses_as_the_number_it_writes() -> None:
    """`0e99999999999999999999` is valid JSON (zero), but `Decimal` raises on its exponent: such a body was refused as
    not JSON at all (any field, `guidance_scale` too). Zero is zero; `1e-99999999999999999999`, a fraction its float
    rounds to 0.0, is refused by an integer field and shown as written."""
    import pydantic

    from catrt.serve.echo import echo_json
    from catrt.serve.json_body import loads_unique

    zeros = loads_unique(b'{"prompt": "p", "seed": 0e99999999999999999999, "guidance_scale": -0.0e-99999999999999999999}')
    assert ImageGenerationRequest.model_validate(zeros).model_dump(include={"seed", "guidance_scale"}) == {
        "seed": 0, "guidance_scale": 0.0}
    for written in ("1e-99999999999999999999", "-0.5e-99999999999999999999"):
        body = loads_unique(b'{"prompt": "p", "seed": %s, "guidance_scale": %s}' % (written.encode(), written.encode()))
        assert body["guidance_scale"] == 0.0  # a float field reads it as its float, as before
        with pytest.raises(pydantic.ValidationError) as refused:
            ImageGenerationRequest.model_validate(body)
        error = refused.value.errors()[0]
        assert (error["loc"], error["type"], echo_json(error["input"])) == (("seed",), "int_type", written)
