"""The server over loopback: a real uvicorn on 127.0.0.1, concurrent clients, every error path.

Oracles: an independently loaded copy of the model with each adapter activated alone (``rw.set_active``),
run one request at a time (greedy ``generate``, the transcribed mean pooling, the classifier's logits)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from _serve_helpers import (  # noqa: E402
    build_bert_dir,
    build_llama_dir,
    greedy,
    make_llama,
    oracle_model,
    perturb,
    pooled,
    serving,
    tar_of,
)

import rankwise as rw  # noqa: E402
from rankwise.serve import AdapterCache, Engine, load_model  # noqa: E402
from rankwise.serve.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
TOKEN = "s3cret-token"
ORACLE_NAME = {"a": "a", "b": "b", "d": "default", None: None}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_oracle(llama_dir):
    return oracle_model(llama_dir)


def _app(root, token=TOKEN, window_s=0.02, max_queue=64, max_batch=16, **kw):
    model, tok, task = load_model(root / "model", "cpu")
    cache = AdapterCache(model, root / "adapters", max_bytes=1 << 26)
    engine = Engine(model, tok, task, cache, max_batch=max_batch, window_s=window_s, max_queue=max_queue)
    return create_app(engine, base_name="tiny", token=token, **kw), engine


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, 30000, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_concurrent_completions_equal_direct_calls(llama_dir, llama_oracle):
    model, tok, _ = llama_oracle
    app, engine = _app(llama_dir)
    prompts = _prompts(24)
    adapters = ["a", "b", "d", None] * 6
    expected = [greedy(model, p, ORACLE_NAME[a], 6) for p, a in zip(prompts, adapters)]
    assert len({tuple(e) for e in expected[:4]}) == 4  # the adapters change the output
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def ask(i):
            body = {"model": adapters[i] or "tiny", "prompt": prompts[i], "max_tokens": 6, "temperature": 0}
            return client.post("/v1/completions", json=body)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(ask, range(len(prompts))))
        metrics = client.get("/metrics").text
        text = client.post("/v1/completions", json={"model": "a", "prompt": "the quick brown fox", "max_tokens": 4,
                                                    "temperature": 0}).json()
    for r, exp in zip(responses, expected):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and len(body["choices"]) == 1
        assert body["choices"][0]["text"] == tok.decode(exp, skip_special_tokens=True)
        assert body["usage"]["completion_tokens"] == len(exp)
    batches = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("rankwise_batches_total"))
    assert 0 < batches < len(prompts)  # requests shared batches
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert text["choices"][0]["text"] == tok.decode(greedy(model, ids, "a", 4), skip_special_tokens=True)


def test_streaming_matches_non_streaming(llama_dir):
    app, _ = _app(llama_dir)
    prompt = _prompts(1, seed=5)[0]
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = {"model": "d", "prompt": [prompt, prompt[:3]], "max_tokens": 7, "temperature": 0}
        plain = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    texts, reasons = ["", ""], [None, None]
    for ln in lines[:-1]:
        ch = json.loads(ln[len("data: "):])["choices"][0]
        texts[ch["index"]] += ch["text"]
        reasons[ch["index"]] = ch["finish_reason"] or reasons[ch["index"]]
    assert texts == [c["text"] for c in plain["choices"]]
    assert reasons == [c["finish_reason"] for c in plain["choices"]]


def test_embeddings_and_classify_equal_direct_calls(tmp_path):
    enc = build_bert_dir(tmp_path / "enc", classifier=False)
    cls = build_bert_dir(tmp_path / "cls", classifier=True)
    texts = ["a small test", "another sentence here", "x", "serving many adapters at once"]
    e_model, tok, _ = oracle_model(enc)
    c_model, _, _ = oracle_model(cls)
    e_app, _ = _app(enc)
    c_app, _ = _app(cls)
    with serving(e_app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda a: client.post("/v1/embeddings", json={"model": a, "input": texts}),
                               ["a", "b", "tiny", "a", "b", "tiny"]))
        b64 = client.post("/v1/embeddings", json={"model": "b", "input": texts[0], "encoding_format": "base64"}).json()
        wrong = client.post("/v1/classify", json={"input": "x"})
    for r, a in zip(rs, ["a", "b", None] * 2):
        assert r.status_code == 200, r.text
        for item, t in zip(r.json()["data"], texts):
            ids = tok(t)["input_ids"]
            torch.testing.assert_close(torch.tensor(item["embedding"]), pooled(e_model, ids, a), atol=1e-5, rtol=1e-5)
    import base64

    import numpy as np

    vec = torch.from_numpy(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4").copy())
    torch.testing.assert_close(vec, pooled(e_model, tok(texts[0])["input_ids"], "b"), atol=1e-5, rtol=1e-5)
    assert wrong.status_code == 404 and "/v1/embeddings" in wrong.json()["error"]["message"]
    with serving(c_app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda a: client.post("/v1/classify", json={"model": a, "input": texts}),
                               ["b", "a", "tiny", "b"]))
    for r, a in zip(rs, ["b", "a", None, "b"]):
        assert r.status_code == 200, r.text
        for item, t in zip(r.json()["data"], texts):
            with torch.no_grad():
                rw.set_active(c_model, a)
                ref = c_model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0]
            torch.testing.assert_close(torch.tensor(item["logits"]), ref, atol=1e-5, rtol=1e-5)
            assert item["label"] == c_model.config.id2label[int(ref.argmax())]


def test_errors_404_413_422_and_models(llama_dir):
    app, _ = _app(llama_dir, max_request_bytes=4096)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        models = client.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny", "a", "b", "d"]
        r = client.post("/v1/completions", json={"model": "nope", "prompt": [5, 6]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert client.get("/v1/nothing").status_code == 404
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 404  # a causal LM
        r = client.post("/v1/completions", json={"prompt": [1] * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = client.post("/v1/completions", content=b"{" * 3000 + b"x" * 2000,
                        headers={"content-type": "application/json"})
        assert r.status_code == 413
        for bad in (b"not json", b"[1, 2]", json.dumps({"prompt": 5}).encode(),
                    json.dumps({"prompt": [1, 2], "max_tokens": 0}).encode(),
                    json.dumps({"prompt": [1, 2], "n": 2}).encode(),
                    json.dumps({"prompt": [1, 10 ** 9]}).encode(),
                    json.dumps({"prompt": "hi", "stop": ["\n"]}).encode()):
            r = client.post("/v1/completions", content=bad, headers={"content-type": "application/json"})
            assert r.status_code == 422, (bad, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert client.get("/health").json()["status"] == "ok"
        text = client.get("/metrics").text
        assert "# TYPE rankwise_requests_total counter" in text and 'code="413"' in text


def test_full_queue_answers_503_with_retry_after(llama_dir):
    app, engine = _app(llama_dir, max_queue=2, window_s=0.0)
    gate = threading.Event()
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        engine.call(gate.wait)  # the worker is busy until the gate opens
        body = {"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(client.post, "/v1/completions", json=body) for _ in range(2)]
            deadline = 0
            while len(engine._queue) < 2 and deadline < 500:
                threading.Event().wait(0.01)
                deadline += 1
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            gate.set()
            assert [f.result().status_code for f in waiting] == [200, 200]


def test_upload_needs_token_and_is_checked(llama_dir, tmp_path):
    src = tmp_path / "new"
    m = make_llama()
    rw.adapt(m, "lora", name="x", rank=3, targets=["k_proj"], seed=9)
    perturb(m, "x", 9)
    rw.save(m, src)
    data = tar_of(src)
    off, _ = _app(llama_dir, token=None)
    with serving(off) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/adapters?name=new", content=data, headers={"content-type": "application/x-tar"})
        assert r.status_code == 403
    root = tmp_path / "served"
    import shutil

    shutil.copytree(llama_dir, root)
    app, _ = _app(root)
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/x-tar"}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/adapters?name=new", content=data, headers={"content-type": "application/x-tar"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = client.post("/v1/adapters?name=new", content=data, headers={**auth, "authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert client.delete("/v1/adapters/a").status_code == 401
        for extra in ({"../evil.txt": b"x"}, {"model.bin": b"pickle"}, {"/etc/passwd": b"x"}):
            r = client.post("/v1/adapters?name=new", content=tar_of(src, extra), headers=auth)
            assert r.status_code == 422, (extra, r.text)
        assert not (root / "adapters" / "new").exists() and not (root / "evil.txt").exists()
        r = client.post("/v1/adapters?name=..", content=data, headers=auth)
        assert r.status_code == 422
        r = client.post("/v1/adapters?name=new", content=data, headers=auth)
        assert r.status_code == 201, r.text
        assert r.json()["replaced"] is False
        prompt = [2000, 2001, 2002]
        got = client.post("/v1/completions", json={"model": "new", "prompt": prompt, "max_tokens": 5,
                                                   "temperature": 0}).json()
        r = client.post("/v1/adapters", json={"name": "viapath", "path": str(src)},
                        headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        assert client.delete("/v1/adapters/new", headers=auth).status_code == 200
        assert client.post("/v1/completions", json={"model": "new", "prompt": prompt}).status_code == 404
        assert client.delete("/v1/adapters/new", headers=auth).status_code == 404
        assert not (root / "adapters" / "new").exists()
    rw.set_active(m, "x")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir / "model")
    base = load_model(llama_dir / "model", "cpu")[0]
    rw.load(base, src)
    assert got["choices"][0]["text"] == tok.decode(greedy(base, prompt, "x", 5), skip_special_tokens=True)


def test_hot_swap_under_load(llama_dir, llama_oracle, tmp_path):
    """Requests for 'h' and 'a' run while 'h' is replaced: each 'h' answer is v1's or v2's (v2's once the
    upload returned), each 'a' answer is a's: no failure, no mix-up."""
    import shutil

    root = tmp_path / "served"
    shutil.copytree(llama_dir, root)
    versions = []
    for v, seed in (("v1", 21), ("v2", 22)):
        m = make_llama()
        rw.adapt(m, "lora", name="h", rank=4, targets="all-linear", seed=seed)
        perturb(m, "h", seed)
        rw.save(m, tmp_path / v)
        versions.append(tmp_path / v)
    shutil.copytree(versions[0], root / "adapters" / "h")
    prompt = [3000, 3001, 3002, 3003]
    outs = {}
    for i, path in enumerate(versions):
        m = load_model(llama_dir / "model", "cpu")[0]
        rw.load(m, path)
        outs[i] = greedy(m, prompt, "h", 5)
    assert outs[0] != outs[1]
    a_model, tok, _ = llama_oracle
    expect_a = greedy(a_model, prompt, "a", 5)
    app, _ = _app(root)
    results, stop = [], threading.Event()
    swapped = threading.Event()
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def load(name):
            while not stop.is_set():
                after = swapped.is_set()
                r = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 5,
                                                         "temperature": 0})
                results.append((name, after, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200
                                else r.text))

        threads = [threading.Thread(target=load, args=(n,)) for n in ("h", "h", "a", "h")]
        for t in threads:
            t.start()
        threading.Event().wait(0.3)
        r = client.post("/v1/adapters?name=h", content=tar_of(versions[1]),
                        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/x-tar"})
        assert r.status_code == 201 and r.json()["replaced"] is True
        swapped.set()
        threading.Event().wait(0.3)
        stop.set()
        for t in threads:
            t.join()
    text = {k: tok.decode(v, skip_special_tokens=True) for k, v in outs.items()}
    assert all(code == 200 for _, _, code, _ in results), [r for r in results if r[2] != 200][:3]
    h = [(after, t) for n, after, _, t in results if n == "h"]
    assert {t for _, t in h} <= {text[0], text[1]}
    assert all(t == text[1] for after, t in h if after)
    assert any(t == text[0] for _, t in h) and any(after for after, _ in h)
    assert all(t == tok.decode(expect_a, skip_special_tokens=True) for n, _, _, t in results if n == "a")
