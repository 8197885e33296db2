"""The app's API under attack and faults: what any script can send to /gradio_api/call/<name> and
/gradio_api/queue/join (and gradio_client), on the real DeiT-Tiny served in-process.

Refused server paths get the project's message whatever marker they carry; concurrent calls that share a
session_hash each get their own image's answer; bad values get one clear line each; view_api lists block and head
as the endpoints take them; and a refused request is one line in the server log, never a traceback.
"""

import base64
import io
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from app_server import client, photos, running_app, server, url  # noqa: F401 (shared fixtures)
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from zoomvit.app import serving
from zoomvit.app import ui as app
from zoomvit.checks import check_choice, check_number, finite_number
from zoomvit.errors import ZoomViTError
from zoomvit.vit_analyzer import predict

pytestmark = [  # Gradio's queue trips over pandas 3 deprecations: not ours
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

FILE_MARKER = {"meta": {"_type": "gradio.FileData"}}  # Gradio's own marker: it copies such a path into its cache


@pytest.fixture(scope="module")
def expected(photos, deit_tiny):
    """The library's own top label of each photo."""
    labels = {name: deit_tiny.label(int(predict(deit_tiny, path).argmax())) for name, path in photos.items()}
    assert labels["tench"] != labels["shark"]
    return labels


@pytest.fixture(scope="module")
def uploaded(url, photos):
    """Each photo sent through the server's upload route, as {"path": ...} for an image input."""
    paths = {}
    for name, path in photos.items():
        with open(path, "rb") as f:
            response = httpx.post(f"{url}gradio_api/upload", files={"files": (f"{name}.jpg", f)}, timeout=30)
        paths[name] = {"path": response.json()[0], **FILE_MARKER}
    return paths


@pytest.fixture(scope="module")
def defaults(client):
    """Every public endpoint's values after the image, as view_api lists their defaults (the plain HTTP API fills
    in none)."""
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    return {
        name.lstrip("/"): [p["parameter_default"] for p in info["parameters"][1:]] for name, info in endpoints.items()
    }


# ---- the plain HTTP API, as any script can call it --------------------------------------------------------------


def post_call(url, api_name, data, session_hash=None) -> str:
    body = {"data": data} if session_hash is None else {"data": data, "session_hash": session_hash}
    # json.dumps writes NaN and Infinity, as a script's JSON library may: Gradio reads them
    response = httpx.post(
        f"{url}gradio_api/call/{api_name}",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["event_id"]


def read_answer(url, api_name, event_id, timeout=120.0):
    """(event, data) of a call's answer: the first 'complete' or 'error' of its stream (a 404 is an answer too)."""
    deadline, lines = time.monotonic() + timeout, []
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as response:
        if response.status_code != 200:
            return "http", response.status_code
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("data:") and len(lines) > 1 and lines[-2] in ("event: complete", "event: error"):
                return lines[-2].split(": ")[1], json.loads(line[5:])
            assert time.monotonic() < deadline, lines[-4:]
    return "closed", lines[-4:]


def raw_call(url, api_name, data, session_hash=None):
    return read_answer(url, api_name, post_call(url, api_name, data, session_hash))


def join_queue(url, demo, api_name, values, session_hash) -> str:
    """One event through /gradio_api/queue/join, as the browser sends it (every input, the session's as null)."""
    fn = next(f for f in demo.fns.values() if f.api_name == api_name)
    given = iter(values)
    data = [None if isinstance(block, app.gr.State) else next(given) for block in fn.inputs]
    body = {"data": data, "fn_index": fn._id, "session_hash": session_hash, "trigger_id": None, "event_data": None}
    response = httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["event_id"]


def queue_answers(url, session_hash, event_ids, timeout=120.0) -> dict:
    """event id -> (success, output) for each of `event_ids`, from the session's one /queue/data stream."""
    answers, deadline = {}, time.monotonic() + timeout
    with httpx.stream(
        "GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    answers[message["event_id"]] = (message["success"], message["output"])
                if set(event_ids) <= set(answers) or message.get("msg") == "close_stream":
                    break
            assert time.monotonic() < deadline
    return answers


def ours(message):
    return ("error", {"error": message, "duration": 10, "visible": True, "title": "Error"})


# ---- 1. a refused server path: the project's message, never {"error": null} -------------------------------------


def test_a_server_path_with_gradios_file_marker_gets_the_projects_message(server, url, photos, defaults):
    """Gradio's own check refused a marked path before the app's upload guard saw it, and answered
    {"error": null}: now every endpoint says what the unmarked path gets, over /call and /queue/join alike."""
    demo, _ = server
    upload_folder = serving.get_upload_folder()
    paths = (photos["tench"], "/etc/hostname", "/no/such/file.png", f"{upload_folder}/../../etc/hostname")
    for api_name, options in defaults.items():
        for path in paths:
            for marker in ({}, FILE_MARKER):
                answer = raw_call(url, api_name, [{"path": path, **marker}, *options])
                assert answer == ours(serving.NOT_UPLOADED), (api_name, path, marker, answer)
    event = join_queue(url, demo, "explain", [{"path": "/etc/hostname", **FILE_MARKER}, *defaults["explain"]], "jq1")
    success, output = queue_answers(url, "jq1", [event])[event]
    assert not success and output["error"] == serving.NOT_UPLOADED


def test_an_image_that_is_not_a_file_object_or_too_few_values_get_a_message(url, defaults):
    """Gradio's own data checks answered {"error": null} too."""
    for image in (5, "tench.jpg", {"path": 5}, [1, 2]):
        assert raw_call(url, "explain", [image, *defaults["explain"]]) == ours(serving.NOT_A_FILE), image
    count = 1 + len(defaults["explain"])
    assert raw_call(url, "explain", []) == ours(
        f"This call takes {count} values, in the order view_api lists them; got 0."
    )


# ---- 2. concurrent calls sharing a session_hash ----------------------------------------------------------------


def label_of(answer):
    event, data = answer
    assert event == "complete", answer
    return data[1]["label"]


def test_concurrent_raw_calls_that_share_a_session_hash_each_get_their_own_answer(url, uploaded, expected, defaults):
    """Gradio streams /call/<name>/<event_id> from the session's queue, not the event's: with the shark's call
    queued first and the tench's answer read first, the tench call was answered 'great white shark' and the
    shark's got a 404."""
    options = ["rollout", *defaults["explain"][1:]]
    for trial in range(2):
        session = f"shared-{trial}"
        shark = post_call(url, "explain", [uploaded["shark"], *options], session)
        tench = post_call(url, "explain", [uploaded["tench"], *options], session)
        with ThreadPoolExecutor(2) as pool:
            tench_answer = pool.submit(read_answer, url, "explain", tench)
            time.sleep(0.3)  # the tench stream waits first
            shark_answer = pool.submit(read_answer, url, "explain", shark)
            assert label_of(tench_answer.result()) == expected["tench"]
            assert label_of(shark_answer.result()) == expected["shark"]


def test_concurrent_queue_events_of_one_session_each_get_their_own_answer(server, url, uploaded, expected, defaults):
    """The same over /queue/join (one stream for the session, each answer named by its event): the session's
    State holds one image's analysis at a time, and a call for another image never gets it."""
    demo, _ = server
    options = ["rollout", *defaults["explain"][1:]]
    events = {}
    for name in ("shark", "tench", "shark", "tench"):
        events[join_queue(url, demo, "explain", [uploaded[name], *options], "joined")] = name
    answers = queue_answers(url, "joined", list(events))
    assert set(answers) == set(events)
    for event, name in events.items():
        success, output = answers[event]
        assert success and output["data"][1]["label"] == expected[name], (name, output)


def test_an_api_call_for_another_image_never_reuses_the_sessions_analysis(client, photos, expected):
    """One gradio_client session, its image changing between calls of every endpoint that takes one."""
    for name in ("tench", "shark", "tench"):
        label = client.predict(handle_file(photos[name]), "rollout", api_name="/explain")[1]["label"]
        assert label == expected[name]
        before = client.predict(handle_file(photos[name]), 1.0, api_name="/prune")[1]["label"]
        assert before == expected[name]


# ---- 3. bad values: one clear line each --------------------------------------------------------------------------

BAD_VALUES = [
    ({"discard_ratio": "abc"}, "Discard ratio must be a number, got 'abc'."),
    ({"discard_ratio": None}, "Discard ratio is empty: give a number."),
    ({"colormap": None}, "Colormap must be one of jet, turbo, viridis, inferno, magma, plasma, hot, gray; got None."),
    (
        {"colormap": "rainbow"},
        "Colormap must be one of jet, turbo, viridis, inferno, magma, plasma, hot, gray; got 'rainbow'.",
    ),
    ({"block": "three"}, "Block must be in 1..12 (or -1 for the last), got three."),
    ({"block": 2.5}, "Block must be in 1..12 (or -1 for the last), got 2.5."),
    ({"block": True}, "Block must be in 1..12 (or -1 for the last), got True."),
    ({"block": [3]}, "Block must be in 1..12 (or -1 for the last), got [3]."),
    ({"head": 4}, "Head must be in 1..3 (or -1 for the last), or mean, max or min; got 4."),
    ({"head": {"h": 1}}, "Head must be in 1..3 (or -1 for the last), or mean, max or min; got {'h': 1}."),
]


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_a_bad_view_value_is_one_clear_line(client, photos, values, message):
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(photos["tench"]), api_name="/explain", **{"view": "rollout", **values})
    assert str(refused.value) == message


def test_a_point_that_is_not_a_finite_number_is_one_clear_line(client, url, photos, uploaded, defaults):
    """NaN and Infinity as JSON numbers (any script's JSON library may send them; gradio_client refuses to),
    and as text."""
    options = defaults["inspect_patch"][2:]
    for x, shown in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf")):
        answer = raw_call(url, "inspect_patch", [uploaded["tench"], x, 100, *options])
        assert answer == ours(f"x must be a finite number, got {shown}."), answer
        answer = raw_call(url, "inspect_patch", [uploaded["tench"], 100, x, *options])
        assert answer == ours(f"y must be a finite number, got {shown}."), answer
    for x, message in (
        ("nan", "x must be a finite number, got 'nan'."),
        ("left", "x must be a number, got 'left'."),
        ([1], "x must be a number, got [1]."),
    ):
        with pytest.raises(AppError) as refused:
            client.predict(handle_file(photos["tench"]), x, 100, api_name="/inspect_patch")
        assert str(refused.value) == message
    _, caption, *_ = client.predict(handle_file(photos["tench"]), 250, 180, api_name="/inspect_patch")
    assert "row 6, column 7" in caption  # and still serving


def test_the_number_and_choice_checks():
    assert finite_number(" 2.5 ", "x") == 2.5 and finite_number("", "x") is None and finite_number(None, "x") is None
    for bad, message in (
        (True, "x must be a number, got True."),
        (math.nan, "x must be a finite number, got nan."),
        ("1e999", "x must be a finite number, got '1e999'."),
        (10**400, "x must be a number"),
    ):
        with pytest.raises(ZoomViTError, match=message.replace(".", r"\.")):
            finite_number(bad, "x")
    assert check_number(0, "Discard ratio") == 0.0
    with pytest.raises(ZoomViTError, match="Discard ratio is empty: give a number."):
        check_number(" ", "Discard ratio")
    assert check_choice("jet", ["jet", "gray"], "Colormap") == "jet"
    with pytest.raises(ZoomViTError, match=r"Colormap must be one of jet, gray; got \['jet'\]\."):
        check_choice(["jet"], ["jet", "gray"], "Colormap")


# ---- 4. view_api lists block and head as the endpoint takes them ------------------------------------------------


def test_view_api_lists_block_and_head_as_the_endpoints_take_them(client, photos):
    """Block was listed as text ('1'..'12') that the endpoint refused, and head as text that it took while it
    refused numbers: both are listed as numbers from 1 (-1: the last) now, and every listed form works."""
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for api_name in ("/explain", "/inspect_patch"):
        listed = {p["parameter_name"]: p["python_type"] for p in endpoints[api_name]["parameters"]}
        assert listed["block"] == {"type": "int", "description": "block number 1..12; -1: the last"}
        assert listed["head"] == {
            "type": "int | Literal['mean', 'max', 'min']",
            "description": "head number 1..3; -1: the last; or mean, max or min over the heads",
        }
    image = handle_file(photos["tench"])
    for block, head, shown in (
        (1, 1, "block 1, head 1."),
        (-1, -1, "block 12, head 3."),
        (12, 2, "block 12, head 2."),
        ("3", "2", "block 3, head 2."),
        (5, "max", "block 5, max over heads."),
    ):
        caption = client.predict(image, "cls", block, head, api_name="/explain")[3]
        assert caption.endswith(shown), (block, head, caption)


# ---- 5. a refused request is one line in the server log ---------------------------------------------------------


def test_a_refused_request_logs_one_line_and_no_traceback(client, url, photos, defaults, capfd, caplog):
    """Gradio printed a traceback for every refusal (a user's mistake, not a fault)."""
    caplog.set_level(logging.WARNING, logger="zoomvit.app")
    capfd.readouterr()
    image = handle_file(photos["tench"])
    data_url = io.BytesIO()
    Image.new("RGB", (8, 8)).save(data_url, "png")
    data_url = "data:image/png;base64," + base64.b64encode(data_url.getvalue()).decode()
    refusals = [
        lambda: client.predict(image, "rollout", discard_ratio="abc", api_name="/explain"),  # our check
        lambda: client.predict(image, "nonsense", api_name="/explain"),  # Gradio's choice check
        lambda: client.predict(image, "cls", block=99, api_name="/explain"),
        lambda: client.predict(image, "left", 3, api_name="/inspect_patch"),
        lambda: client.predict(image, keep=0.5, after_block=12, api_name="/prune"),
    ]
    for refuse in refusals:
        with pytest.raises(AppError):
            refuse()
    raw = [
        [{"path": "/etc/hostname", **FILE_MARKER}, *defaults["explain"]],  # Gradio's path check
        [{"path": "/etc/hostname"}, *defaults["explain"]],  # the app's upload guard
        [{"path": None, "url": data_url, **FILE_MARKER}, *defaults["explain"]],  # an inline data: URL
        [5, *defaults["explain"]],  # not a file object
        [None, *defaults["explain"]],  # no image
    ]
    for data in raw:
        assert raw_call(url, "explain", data)[0] == "error"
    time.sleep(0.5)  # the server thread's last log line
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, (out + err)[-3000:]
    lines = [r.getMessage() for r in caplog.records if r.name == "zoomvit.app"]
    assert len(lines) == len(refusals) + len(raw), lines
    assert all(
        line.startswith(("refused explain: ", "refused inspect_patch: ", "refused prune: ")) and "\n" not in line
        for line in lines
    ), lines
    assert "refused explain: Discard ratio must be a number, got 'abc'." in lines
    assert f"refused explain: {serving.NOT_UPLOADED}" in lines


def test_a_fault_in_a_handler_still_logs_its_traceback(client, photos, caplog, monkeypatch):
    """Not a user's mistake: the message says so, and the log keeps the traceback to find it by."""
    from zoomvit.app import views

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(views.ViewRenderer, "render", broken)
    caplog.set_level(logging.WARNING, logger="zoomvit.app")
    with pytest.raises(AppError, match=r"Something went wrong \(RuntimeError\); the server log has the details\."):
        client.predict(handle_file(photos["tench"]), "rollout", api_name="/explain")
    faults = [r for r in caplog.records if r.name == "zoomvit.app" and r.exc_info]
    assert len(faults) == 1 and "a bug" in str(faults[0].exc_info[1])


# ---- the session hash of a plain call ---------------------------------------------------------------------------


def test_a_plain_call_loses_only_its_session_hash():
    body = {"data": [1, math.nan], "session_hash": "abc", "event_data": None}
    stripped = json.loads(serving.without_session_hash(json.dumps(body).encode()))
    assert set(stripped) == {"data", "event_data"} and stripped["data"][0] == 1 and math.isnan(stripped["data"][1])
    for body in (b"not json", b"[1, 2]", b'{"data": []}', b'{"data": ["session_hash"]}'):
        assert serving.without_session_hash(body) == body
    for path in (
        "/gradio_api/call/explain",
        "/gradio_api/call/explain/",
        "/gradio_api/call/v2/explain",
        "/prefix/gradio_api/call/prune",
    ):
        assert serving.CALL_ROUTE.search(path), path
    for path in ("/gradio_api/call/explain/abc123", "/gradio_api/queue/join", "/gradio_api/upload"):
        assert not serving.CALL_ROUTE.search(path), path


def test_the_browser_queue_keeps_its_session(server, url, uploaded, expected, defaults):
    """Only the plain call route drops the session_hash: /queue/join keeps it, and the session's State holds the
    analysis afterwards."""
    demo, _ = server
    event = join_queue(url, demo, "explain", [uploaded["tench"], "rollout", *defaults["explain"][1:]], "kept")
    success, output = queue_answers(url, "kept", [event])[event]
    assert success and output["data"][1]["label"] == expected["tench"]
    state = next(
        block for block in demo.blocks.values() if isinstance(block, app.gr.State) and block.time_to_live is not None
    )
    session = demo.state_holder["kept"].state_data.get(state._id)
    assert session is not None and session.bundle.label(session.analysis.predicted) == expected["tench"]
