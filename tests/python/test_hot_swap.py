"""Hot-swap through the admin API on the real server: the fused checkpoint
replaces the base model behind the alias `target` in the middle of steady
concurrent load, with zero failed requests, every response naming its weights
in `system_fingerprint`; loads outside the model root are refused (403);
a load that fails leaves the old model serving."""

import json
import shutil
import threading
import time

import httpx
import pytest

from conftest import BASE_SMOLLM2, Server, metric, scrape

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def swap_server(tmp_path_factory, trained_smollm2):
    root = tmp_path_factory.mktemp("model-root")
    shutil.copytree(BASE_SMOLLM2, root / "base")
    shutil.copytree(trained_smollm2, root / "fused")
    # A folder whose weights are corrupt, and one naming an unknown architecture.
    shutil.copytree(BASE_SMOLLM2, root / "corrupt", ignore=shutil.ignore_patterns("model.safetensors"))
    (root / "corrupt" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    shutil.copytree(BASE_SMOLLM2, root / "wrongarch")
    config = json.loads((root / "wrongarch" / "config.json").read_text())
    config.update(architectures=["NoSuchModelForCausalLM"], model_type="no_such_model")
    (root / "wrongarch" / "config.json").write_text(json.dumps(config))
    shutil.copytree(BASE_SMOLLM2, root / "noconfig", ignore=shutil.ignore_patterns("config.json"))
    outside = tmp_path_factory.mktemp("outside")
    (root / "escape").symlink_to(outside)
    config = f"""
[auth]
admin_key = "admin-secret"

[admin]
model_root = "{root}"

[[models]]
id = "smollm2-base"
path = "{root / 'base'}"
max_seqs = 8

[aliases]
target = "smollm2-base"
"""
    s = Server(config, "swap")
    yield s, root, outside
    s.stop()


def chat(base, model="target", timeout=120):
    return httpx.post(
        base + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0},
        timeout=timeout,
    )


def test_refusals_leave_serving_untouched(swap_server):
    s, root, outside = swap_server
    before = chat(s.base).json()["system_fingerprint"]
    assert httpx.post(s.base + "/admin/models", json={"id": "x", "path": "base"}).status_code == 401
    for path in ["../outside", str(outside), "escape", "/etc"]:
        r = httpx.post(s.base + "/admin/models", headers=ADMIN, json={"id": "x", "path": path})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["type"] == "permission_error"
    # Corrupt weights, an unknown architecture, no config.json, no folder at all.
    for broken in ["corrupt", "wrongarch", "noconfig", "missing"]:
        r = httpx.post(s.base + "/admin/models", headers=ADMIN, json={"id": "smollm2-base", "path": broken}, timeout=600)
        assert r.status_code == 422, (broken, r.text)
        error = r.json()["error"]
        assert error["code"] == "model_load_failed", (broken, error)
        if broken != "missing":
            assert "still serves" in error["message"], (broken, error)
    after = chat(s.base)
    assert after.status_code == 200 and after.json()["system_fingerprint"] == before
    metrics = scrape(s.base)
    assert metric(metrics, "fusechat_model_loads_total", model="x", result="forbidden") == 4
    assert metric(metrics, "fusechat_model_loads_total", model="smollm2-base", result="failed") == 4


def test_swap_under_load_fails_nothing(swap_server):
    s, root, _ = swap_server
    old = chat(s.base).json()["system_fingerprint"]
    results = []  # (start time, status, fingerprint)
    stop = threading.Event()

    def worker():
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(
                        s.base + "/v1/chat/completions",
                        json={"model": "target", "messages": [{"role": "user", "content": "Count to three."}],
                              "max_tokens": 6, "temperature": 0},
                    )
                    fp = r.json().get("system_fingerprint") if r.status_code == 200 else r.text
                    results.append((t0, r.status_code, fp))
                except httpx.HTTPError as e:
                    results.append((t0, 0, repr(e)))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    r = httpx.post(s.base + "/admin/models", headers=ADMIN,
                   json={"id": "smollm2-fused", "path": "fused", "alias": "target"}, timeout=600)
    swapped_at = time.monotonic()
    assert r.status_code == 200, r.text
    new = r.json()["fingerprint"]
    assert new != old
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()

    failures = [x for x in results if x[1] != 200]
    assert not failures, failures[:5]
    fingerprints = {fp for _, _, fp in results}
    assert fingerprints <= {old, new}, fingerprints
    assert old in fingerprints and new in fingerprints, "load did not span the swap"
    late = [fp for t0, _, fp in results if t0 > swapped_at]
    assert late and all(fp == new for fp in late), "a request sent after the swap ran on the old weights"

    models = httpx.get(s.base + "/v1/models").json()["data"]
    alias = next(m for m in models if m["id"] == "target")
    assert alias["alias_of"] == "smollm2-fused"
    metrics = scrape(s.base)
    assert metric(metrics, "fusechat_model_loads_total", model="smollm2-fused", result="ok") == 1
    assert metric(metrics, "fusechat_alias_info", alias="target", fingerprint=new, model="smollm2-fused") == 1

    # The model behind an alias cannot be unloaded; the old one can.
    assert httpx.delete(s.base + "/admin/models/smollm2-fused", headers=ADMIN).status_code == 409
    assert httpx.delete(s.base + "/admin/models/smollm2-base", headers=ADMIN).status_code == 200
    assert chat(s.base, model="smollm2-base").status_code == 404
    assert chat(s.base).json()["system_fingerprint"] == new
