"""Every model through every door: a VQA package (BLIP VQA), a Florence-2 package, a chat model
(SmolVLM) and the bundled captioner, asked through the Open Inference Protocol (tritonclient.http),
OpenAI's chat completions (the `openai` client, streaming and not, and curl), the CLI and the batch
job, each giving the text (and Florence-2's structured answer) that the Python API gives for the
same image and input. Servers run on loopback, bounded in time, stopped at the end; the in-process
app (Starlette's TestClient) serves the checks that need no real socket."""

import base64
import json
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from benchmarks.serve import Server
from helpers import ROOT
from runtime import Captioner

KEY = "door-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "what is in the picture?"


@pytest.fixture(scope="module")
def packages(hf_model) -> dict:
    return {"vqa": hf_model("blip-vqa")[1], "florence": hf_model("florence2-w2")[1], "chat": hf_model("smolvlm")[1]}


@pytest.fixture(scope="module")
def api(packages) -> dict:
    """The Python API on each package: what every door must give."""
    return {name: Captioner(pkg, provider="cpu") for name, pkg in packages.items()} | {
        "captioner": Captioner(provider="cpu")}


@pytest.fixture(scope="module")
def florence_server(packages):
    running = Server(["--provider", "cpu", "--model", str(packages["florence"]), "--api-key", KEY,
                      "--max-delay-ms", "50"])
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop()


@contextmanager
def app(captioner: Captioner, **settings):
    """The service app over a loaded captioner, in this process, behind the API key."""
    from starlette.testclient import TestClient

    from runtime.service import ServiceConfig, build_app

    with TestClient(build_app(captioner, ServiceConfig(api_key=KEY, **settings)), raise_server_exceptions=False) as c:
        yield c


def data_url(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def message(path, text: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(path)}}]
    return [{"role": "user", "content": parts + ([{"type": "text", "text": text}] if text is not None else [])}]


def openai_client(client):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def test_metadata_lists_the_inputs_each_package_takes(api):
    takes = {"captioner": [], "vqa": [("question", True)], "florence": [("task", False), ("text", False)],
             "chat": [("question", False)]}
    for name, captioner in api.items():
        with app(captioner) as client:
            model = captioner.manifest.data["name"]
            meta = client.get(f"/v2/models/{model}", headers=AUTH).json()
        assert [(i["name"], i["parameters"]["required"]) for i in meta["inputs"]] == [("image", True), *takes[name]]
        assert [o["name"] for o in meta["outputs"]] == ["caption", *(["result"] if name == "florence" else [])]


def test_tritonclient_sends_tasks_and_gets_florences_structured_answers(florence_server, api, photo_paths):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    cap, paths = api["florence"], [photo_paths["chelsea"], photo_paths["coffee"]]
    client = triton.InferenceServerClient(florence_server)
    model = cap.manifest.data["name"]

    def infer(tasks: list[str], texts: list[str] | None = None):
        inputs = []
        for name, values in [("image", [p.read_bytes() for p in paths]), ("task", tasks), ("text", texts)]:
            if values is not None:
                inputs.append(triton.InferInput(name, [len(values)], "BYTES"))
                inputs[-1].set_data_from_numpy(np.array(values, dtype=object))
        reply = client.infer(model, inputs, headers=dict(AUTH))  # it adds its own to the dict
        return ([c.decode() for c in reply.as_numpy("caption")], [json.loads(r) for r in reply.as_numpy("result")])

    for tasks, texts in [(["<OD>"], None), (["<CAPTION>", "<OCR_WITH_REGION>"], None),
                         (["<CAPTION_TO_PHRASE_GROUNDING>"], ["a cat", "a cup"])]:
        captions, results = infer(tasks, texts)
        for i, path in enumerate(paths):
            task, text = tasks[i % len(tasks)], texts[i] if texts else None
            want = cap.caption(path, task=task, text=text)
            assert captions[i] == want.text and results[i] == json.loads(json.dumps(want.result)), (task, i)
    with pytest.raises(InferenceServerException, match="start the text|takes a task|unknown inputs"):
        inputs = [triton.InferInput("image", [1], "BYTES"), triton.InferInput("question", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([paths[0].read_bytes()], dtype=object))
        inputs[1].set_data_from_numpy(np.array([b"what?"], dtype=object))
        client.infer(model, inputs, headers=dict(AUTH))  # it adds its own to the dict
    client.close()


def test_oip_questions_per_request_or_per_image_and_refusals(api, photo_paths):
    cap, paths = api["vqa"], [photo_paths["chelsea"], photo_paths["astronaut"]]
    model = cap.manifest.data["name"]

    def body(questions):
        inputs = [{"name": "image", "datatype": "BYTES", "shape": [2],
                   "data": [base64.b64encode(p.read_bytes()).decode() for p in paths]}]
        if questions is not None:
            inputs.append({"name": "question", "datatype": "BYTES", "shape": [len(questions)],
                           "data": [base64.b64encode(q.encode()).decode() for q in questions]})
        return json.dumps({"inputs": inputs})

    with app(cap) as client:
        for questions in ([QUESTION], [QUESTION, "how many dogs are there"]):
            reply = client.post(f"/v2/models/{model}/infer", content=body(questions), headers=AUTH)
            want = [cap.caption(p, question=questions[i % len(questions)]).text for i, p in enumerate(paths)]
            assert reply.status_code == 200 and reply.json()["outputs"][0]["data"] == want
        for questions, status, reason in [(None, 400, "input question is required by this model"),
                                          (["a", "b", "c"], 400, "input question has 3 elements; send 1 or one per image (2)")]:
            reply = client.post(f"/v2/models/{model}/infer", content=body(questions), headers=AUTH)
            assert (reply.status_code, reply.json()) == (status, {"error": reason})
        reply = client.post("/caption", params={"question": QUESTION}, content=paths[0].read_bytes(), headers=AUTH)
        assert reply.json()["caption"] == cap.caption(paths[0], question=QUESTION).text
        reply = client.post("/caption", params={"task": "<OD>"}, content=paths[0].read_bytes(), headers=AUTH)
        assert reply.status_code == 400 and reply.json() == {"error": "unknown parameters ['task']; this model takes: question"}


def test_the_openai_client_gets_each_packages_answer_streamed_or_not(api, photo_paths):
    path = photo_paths["chelsea"]
    asks = {"chat": ("Describe the colours.", {"question": "Describe the colours."}), "vqa": (QUESTION, {"question": QUESTION}),
            "florence": ("<CAPTION_TO_PHRASE_GROUNDING> a cat", {"task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "a cat"}),
            "captioner": ("What is this?", {})}
    for name, (text, asked) in asks.items():
        cap = api[name]
        want = cap.caption(path, **asked)
        with app(cap) as client:
            raw = client.post("/v1/chat/completions", json={"messages": message(path, text)}, headers=AUTH).json()
            ai = openai_client(client)
            reply = ai.chat.completions.create(model=cap.manifest.data["name"], messages=message(path, text))
            assert reply.choices[0].message.content == want.text, name
            assert reply.usage.completion_tokens == len(want.tokens) and reply.usage.prompt_tokens == want.prompt_tokens
            assert reply.choices[0].finish_reason == ("length" if len(want.tokens) == cap.generation_config(
                **asked).max_new_tokens else "stop")
            chunks = list(ai.chat.completions.create(model=cap.manifest.data["name"], messages=message(path, text),
                                                     stream=True, stream_options={"include_usage": True}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text, name
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
            assert chunks[-1].usage.completion_tokens == len(want.tokens)
        if name == "florence":  # the structured answer beside the text, in the photo's pixels
            assert raw["result"] == json.loads(json.dumps(want.result))
        assert ("note" in raw) == (name == "captioner"), raw.get("note")


def test_sampling_with_a_seed_gives_the_same_text_on_every_door(api, photo_paths):
    cap, path = api["chat"], photo_paths["coffee"]
    settings = {"temperature": 1.5, "top_p": 0.95, "top_k": 50, "seed": 7}
    want = cap.caption(path, **settings)
    assert want.tokens == cap.caption(path, **settings).tokens
    others = {tuple(cap.caption(path, **{**settings, "seed": s}).tokens) for s in range(4)}
    assert len(others | {tuple(want.tokens)}) > 1, "other seeds should sample other answers"
    assert cap.caption(path, temperature=0.0).tokens == cap.caption(path).tokens  # temperature 0 is greedy
    assert "".join(cap.stream(path, **settings)) == want.text
    with app(cap) as client:
        ai = openai_client(client)
        reply = ai.chat.completions.create(model=cap.manifest.data["name"], messages=message(path), temperature=1.5,
                                           top_p=0.95, seed=7, extra_body={"top_k": 50})  # top_k: vLLM's extension
        assert reply.choices[0].message.content == want.text
    cli = [sys.executable, "-m", "runtime.caption", "--model", str(cap.manifest.root), "--provider", "cpu", str(path),
           "--temperature", "1.5", "--top-p", "0.95", "--top-k", "50", "--seed", "7"]
    r = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"{path}: {want.text}\n", r.stderr
    r = subprocess.run(cli[:-8] + ["--top-p", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: temperature must be >= 0, top_p in (0, 1] and top_k >= 0\n"


def test_chat_requests_the_server_refuses_in_one_line(api, photo_paths):
    path, cap = photo_paths["chelsea"], api["florence"]
    image = {"type": "image_url", "image_url": {"url": data_url(path)}}
    refusals = [
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.jpg"}}]}]},
         400, "image_url is a remote URL"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
         400, "image_url is not a base64 data URL"),
        ({"messages": [{"role": "user", "content": [image, image]}]}, 400, "send exactly one image"),
        ({"messages": [{"role": "user", "content": "hello"}]}, 400, "send exactly one image"),
        ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [image]}]}, 400,
         "send one user message"),
        ({"messages": message(path), "n": 2}, 400, "n must be 1"),
        ({"messages": message(path), "tools": []}, 400, "unsupported fields ['tools']"),
        ({"messages": message(path), "temperature": -1}, 400, "temperature must be >= 0"),
        ({"messages": message(path), "max_tokens": 100_000}, 400, "max tokens must be between 1 and"),
        ({"messages": message(path, "a cat")}, 400, "start the text with one of this model's tasks: <OCR>, "),
        ({"messages": message(path), "model": "gpt-4o"}, 404, "unknown model 'gpt-4o'"),
    ]
    with app(cap) as client:
        for body, status, reason in refusals:
            reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
            error = reply.json()["error"]
            assert reply.status_code == status and error["message"].startswith(reason), (body, reply.text)
            assert "\n" not in error["message"] and error["type"] == "invalid_request_error"
        assert client.post("/v1/chat/completions", content=b"{", headers=AUTH).status_code == 400
        assert client.post("/v1/chat/completions", json={"messages": message(path)}).status_code == 401
        assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == cap.manifest.data["name"]


def test_curl_streams_server_sent_events(florence_server, api, photo_paths):
    path, cap = photo_paths["coffee"], api["florence"]
    body = json.dumps({"messages": message(path, "<OD>"), "stream": True})
    r = subprocess.run(["curl", "-sSN", "--max-time", "120", f"http://{florence_server}/v1/chat/completions",
                        "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", "--data-binary", "@-"],
                       input=body, capture_output=True, text=True, timeout=150)
    events = [line.removeprefix("data: ") for line in r.stdout.splitlines() if line]
    assert r.returncode == 0 and events[-1] == "[DONE]", r.stdout + r.stderr
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == cap.caption(path, task="<OD>").text
    assert chunks[-1]["result"] == json.loads(json.dumps(cap.caption(path, task="<OD>").result))


def test_the_batch_job_asks_each_row_its_own_task(packages, api, photo_paths, tmp_path):
    """Per-row task and text columns; Florence-2's answers as a JSON column; a row the model cannot
    take (grounding without its text) and a missing file are rows with errors; a rerun adds nothing."""
    from test_batch import finish, job, rows

    chelsea, coffee, missing = photo_paths["chelsea"], photo_paths["coffee"], tmp_path / "missing.jpg"
    asked = [(chelsea, "<OD>", ""), (chelsea, "<CAPTION>", ""), (coffee, "<CAPTION_TO_PHRASE_GROUNDING>", "a cup"),
             (coffee, "<CAPTION_TO_PHRASE_GROUNDING>", ""), (missing, "<OD>", "")]
    (tmp_path / "asks.csv").write_text("path,task,text\n" + "".join(f"{p},{t},{x}\n" for p, t, x in asked))
    out = tmp_path / "out"
    with job(out, "--model", str(packages["florence"]), "--provider", "cpu", input_path=tmp_path / "asks.csv") as proc:
        code, err = finish(proc)
    assert code == 1 and err.splitlines()[-1].startswith("5 images captioned (2 errors)"), err
    got = {(r["path"], r["task"], r["text"]): r for r in rows(out)}
    assert len(got) == 5
    for path, task, text in asked[:3]:
        r, want = got[(str(path), task, text or None)], api["florence"].caption(path, task=task, text=text or None)
        assert (r["caption"], json.loads(r["result"]), r["error"]) == (want.text, json.loads(json.dumps(want.result)), None)
    assert got[(str(coffee), "<CAPTION_TO_PHRASE_GROUNDING>", None)]["error"] == \
        "<CAPTION_TO_PHRASE_GROUNDING> needs a text (--text)"
    assert got[(str(missing), "<OD>", None)]["error"].startswith(f"{missing}: ")
    with job(out, "--model", str(packages["florence"]), "--provider", "cpu", input_path=tmp_path / "asks.csv") as proc:
        code, err = finish(proc)
    assert err.splitlines()[-1].startswith("0 images captioned (0 errors)") and len(rows(out)) == 5
