"""Prove the fake Hub in ``hub_server.py`` is faithful enough for upload tests.

The real ``huggingface_hub`` client and ``transformers``' ``push_to_hub`` run in subprocesses pointed at the fake,
so that if either library changes its protocol these tests fail here, in one obvious place, rather than as
puzzling failures in every upload test built on the fake.
"""

import hashlib
import json
import os
import urllib.error
import urllib.request

import pytest


try:
    import hub_server as hub_module
except ModuleNotFoundError:  # tests/ collected as a package (rootdir on sys.path instead of tests/)
    from tests import hub_server as hub_module

HUB_TOKEN = hub_module.HUB_TOKEN
FakeHubServer = hub_module.FakeHubServer
run_with_hub_env = hub_module.run_with_hub_env
# Re-exported so the fixture is available here even before a conftest imports it.
hub_server = hub_module.hub_server


def _run_ok(server, code, tmp_path):
    """Run upload code in a subprocess and load the JSON it wrote, failing with its stderr and the request log."""
    proc = run_with_hub_env(server, code, tmp_path)
    log = "\n".join(server.request_log())
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}\nrequests:\n{log}"
    assert server.unhandled == [], f"fake hub missed routes:\n{log}"
    assert server.errors == [], f"fake hub saw protocol errors: {server.errors}"
    return json.loads((tmp_path / "result.json").read_text())


def _request(server, method, path, body=None, headers=None):
    """Tiny urllib client for exercising the fake's own error paths without importing huggingface_hub."""
    request = urllib.request.Request(server.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_upload_folder_records_exact_files_and_keeps_token_in_auth_header(hub_server, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    text = b"hello fake hub\n"
    weights = os.urandom(2 * 1024 * 1024)
    (folder / "notes.txt").write_bytes(text)
    (folder / "model.safetensors").write_bytes(weights)

    result = _run_ok(
        hub_server,
        f"""
        import json
        from huggingface_hub import HfApi

        api = HfApi()
        url = api.create_repo("user/demo", token={HUB_TOKEN!r})
        again = api.create_repo("user/demo", token={HUB_TOKEN!r}, exist_ok=True)
        info = api.upload_folder(repo_id="user/demo", folder_path={str(folder)!r}, token={HUB_TOKEN!r})
        open({str(folder / "notes.txt")!r}, "w").write("changed in a PR\\n")
        pr = api.upload_folder(repo_id="user/demo", folder_path={str(folder)!r}, token={HUB_TOKEN!r}, create_pr=True)
        json.dump(
            {{
                "url": str(url), "again": str(again), "repo_id": url.repo_id,
                "oid": info.oid, "commit_url": info.commit_url,
                "pr_url": pr.pr_url, "pr_num": pr.pr_num, "pr_revision": pr.pr_revision,
            }},
            open("result.json", "w"),
        )
        """,
        tmp_path,
    )

    assert result["url"] == result["again"] == f"{hub_server.url}/user/demo"
    assert result["repo_id"] == "user/demo"
    assert result["commit_url"] == f"{hub_server.url}/user/demo/commit/{result['oid']}"
    assert result["oid"] == hub_server.head("user/demo")

    assert hub_server.files("user/demo") == {"notes.txt": text, "model.safetensors": weights}
    assert hub_server.lfs_paths("user/demo") == {"model.safetensors"}
    assert hub_server.lfs_objects == {hashlib.sha256(weights).hexdigest(): weights}

    assert result["pr_url"] == f"{hub_server.url}/user/demo/discussions/1"
    assert (result["pr_num"], result["pr_revision"]) == (1, "refs/pr/1")
    assert hub_server.files("user/demo", "refs/pr/1") == {
        "notes.txt": b"changed in a PR\n",
        "model.safetensors": weights,
    }
    assert hub_server.files("user/demo")["notes.txt"] == text, "a PR must not touch main"
    assert [commit.pr_num for commit in hub_server.commits] == [None, 1]
    assert sorted(hub_server.commits[1].added) == ["notes.txt"], "unchanged weights are skipped via preupload oid"

    assert hub_server.token_leaks(HUB_TOKEN) == []
    authorized = {request.route for request in hub_server.requests if "Authorization" in request.headers}
    assert {"/api/repos/create", "/api/models/user/demo/commit/main"} <= authorized
    lfs_puts = [request for request in hub_server.requests if request.method == "PUT"]
    assert len(lfs_puts) == 1 and "Authorization" not in lfs_puts[0].headers
    pr_commits = [r for r in hub_server.requests if r.route.endswith("/commit/main") and r.query.get("create_pr")]
    assert len(pr_commits) == 1


def test_transformers_config_push_to_hub_main_and_dev_branch(hub_server, tmp_path):
    result = _run_ok(
        hub_server,
        f"""
        import json
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        )
        main = config.push_to_hub("user/cfg", token={HUB_TOKEN!r})
        config.num_hidden_layers = 3
        dev = config.push_to_hub("user/cfg", token={HUB_TOKEN!r}, revision="dev")
        loaded = transformers.AutoConfig.from_pretrained("user/cfg", revision="dev", token={HUB_TOKEN!r})
        json.dump(
            {{"main": main.oid, "dev": dev.oid, "dev_url": dev.commit_url, "layers": loaded.num_hidden_layers}},
            open("result.json", "w"),
        )
        """,
        tmp_path,
    )

    assert result["main"] == hub_server.head("user/cfg", "main")
    assert result["dev"] == hub_server.head("user/cfg", "dev")
    assert result["dev_url"] == f"{hub_server.url}/user/cfg/commit/{result['dev']}"
    assert result["layers"] == 3
    assert hub_server.revisions("user/cfg") == ["dev", "main"]

    main_files = hub_server.files("user/cfg")
    dev_files = hub_server.files("user/cfg", "dev")
    assert set(main_files) == set(dev_files) == {"config.json", "README.md"}
    assert json.loads(main_files["config.json"])["num_hidden_layers"] == 2
    assert json.loads(dev_files["config.json"])["num_hidden_layers"] == 3
    assert b"library_name: transformers" in main_files["README.md"]
    # The unchanged README is skipped on the second push thanks to the oid the preupload answer carries.
    assert [sorted(commit.added) for commit in hub_server.commits] == [["README.md", "config.json"], ["config.json"]]

    routes = [(request.method, request.route) for request in hub_server.requests]
    assert ("HEAD", "/user/cfg/resolve/main/README.md") in routes
    assert ("POST", "/api/models/user/cfg/branch/dev") in routes
    readme_heads = [r.status for r in hub_server.requests if r.method == "HEAD" and r.route.endswith("README.md")]
    assert readme_heads[:2] == [404, 200], "first push sees no model card, the second finds the committed one"
    assert hub_server.token_leaks(HUB_TOKEN) == []


def test_unknown_routes_auth_and_bad_lfs_bytes_are_reported():
    with FakeHubServer(token=HUB_TOKEN) as server:
        status, headers, body = _request(server, "GET", "/api/models/user/demo/tree/main")
        assert status == 404 and "no route" in json.loads(body)["error"]
        assert [str(request) for request in server.unhandled] == ["GET /api/models/user/demo/tree/main -> 404"]

        create = json.dumps({"name": "demo", "organization": "user"}).encode()
        assert _request(server, "POST", "/api/repos/create", create)[0] == 401
        bad = {"Authorization": "Bearer hf_wrong"}
        assert _request(server, "POST", "/api/repos/create", create, headers=bad)[0] == 401
        good = {"Authorization": f"Bearer {HUB_TOKEN}"}
        assert _request(server, "POST", "/api/repos/create", create, headers=good)[0] == 200
        assert server.has_repo("user/demo")

        status, headers, _ = _request(server, "HEAD", "/user/demo/resolve/main/README.md")
        assert (status, headers.get("X-Error-Code")) == (404, "EntryNotFound")
        status, headers, _ = _request(server, "HEAD", "/user/nope/resolve/main/README.md")
        assert (status, headers.get("X-Error-Code")) == (404, "RepoNotFound")

        server.errors.clear()
        oid = hashlib.sha256(b"expected").hexdigest()
        assert _request(server, "PUT", f"/__lfs__/{oid}", b"tampered")[0] == 400
        assert server.lfs_objects == {} and len(server.errors) == 1

        commit = "/api/models/user/demo/commit/"
        assert _request(server, "POST", commit + "main", b"not json", headers=good)[0] == 500
        assert "fake hub crashed" in server.errors[-1]
        status, headers, _ = _request(server, "POST", commit + "dev", b"{}", headers=good)
        assert (status, headers.get("X-Error-Code")) == (404, "RevisionNotFound"), "branches must be created first"

        server.seed_repo("user/demo", {"README.md": b"# card\n", "w.safetensors": b"\0" * 10})
        status, headers, body = _request(server, "GET", "/user/demo/resolve/main/README.md")
        assert (status, body, headers["X-Repo-Commit"]) == (200, b"# card\n", server.head("user/demo"))
        status, headers, _ = _request(server, "HEAD", "/user/demo/resolve/main/w.safetensors")
        assert (
            headers["X-Linked-Size"] == "10"
            and headers["X-Linked-Etag"].strip('"') == hashlib.sha256(b"\0" * 10).hexdigest()
        )
        info = json.loads(_request(server, "GET", "/api/models/user/demo/revision/main")[2])
        assert info["sha"] == server.head("user/demo")
        assert [sibling["rfilename"] for sibling in info["siblings"]] == ["README.md", "w.safetensors"]


@pytest.mark.parametrize("leak_in", ["url", "header", "body"])
def test_token_leaks_are_detected(leak_in):
    with FakeHubServer(token=None) as server:
        path, headers, body = "/api/validate-yaml", {"Authorization": f"Bearer {HUB_TOKEN}"}, b"{}"
        if leak_in == "url":
            path += f"?token={HUB_TOKEN}"
        elif leak_in == "header":
            headers["X-Token"] = HUB_TOKEN
        else:
            body = json.dumps({"token": HUB_TOKEN}).encode()
        assert _request(server, "POST", path, body, headers)[0] == 200
        assert len(server.token_leaks(HUB_TOKEN)) == 1
