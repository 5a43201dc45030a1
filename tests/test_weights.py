"""`cir weights list|check|get` and hf:// checkpoints (issue 14), without internet: a local
hub server on 127.0.0.1 stands in for huggingface.co."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cir_cli.cli import app
from cir_cli.recipes import builtin_names
from cir_cli.weights import WEIGHTS, Input, WeightFile, how_to_get, parse_hf_ref
from tests.conftest import REPO, SHARED_DATA

runner = CliRunner()
# The reference READMEs sit beside the shared annotations (../shared/seeds).
SEEDS = SHARED_DATA.parent / "seeds"


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder and hash cache (no models/ folder, nothing cached)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CIR_WEIGHTS_DIR", raising=False)
    return tmp_path


def test_registry_is_consistent() -> None:
    names = set(builtin_names())
    ids = [e.id for e in WEIGHTS]
    assert len(ids) == len(set(ids))
    for entry in WEIGHTS:
        for pattern in entry.recipes:
            assert pattern in names, f"{entry.id}: unknown recipe {pattern}"
        assert entry.sha1 is None or re.fullmatch(r"[0-9a-f]{40}", entry.sha1)
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.url or entry.make or entry.hub, entry.id
    # Every published checkpoint the issue names has a row.
    files = {
        Path(e.local or e.hub_files[0] if (e.local or e.hub_files) else e.id).name for e in WEIGHTS
    }
    for name in (
        "model_base.pth",
        "tuned_blip_best.pt",
        "tuned_blip_mean.pt",
        "combiner.pt",
        "combiner_mean.pt",
        "sprc_cirr.pt",
        "sprc_fiq.pt",
        "lincir_large.pt",
        "tuned_clip_best.pt",
        "tuned_clip_arithmetic.pt",
    ):
        assert name in files, name


def test_bi_blip4cir_hashes_equal_the_published_readme() -> None:
    """An independent read of the seeds' README (not the registry's source code)."""
    readme = next((p for p in SEEDS.glob("*.txt") if "BLIP4CIR" in p.read_text()[:200]), None)
    if readme is None:
        pytest.skip(f"seed READMEs not found under {SEEDS}")
    text = readme.read_text()
    published = dict(re.findall(r"(\w+\.pt) <br />([0-9a-f]{40})", text))
    published["model_base.pth"] = re.search(r"SHA1: ([0-9a-f]{40})", text).group(1)
    assert len(published) == 5
    by_name = {Path(e.local).name: e.sha1 for e in WEIGHTS if e.local and e.sha1}
    for name, sha1 in published.items():
        assert by_name[name] == sha1, name


def test_rerank_zip_sha1_and_the_files_it_holds(isolated: Path) -> None:
    """Candidate re-ranking publishes one zip (DOWNLOAD.md gives its SHA1, quoted by the spec);
    the files inside have no published hash and are checked by the zip listing's sizes. Two of
    them share the name blip_mean.pt: the path picks the row."""
    spec = SHARED_DATA.parent / "specs" / "reranking.md"
    row = next(e for e in WEIGHTS if e.local == "candidate_rerank_ckpts.zip")
    if spec.is_file():
        quoted = re.search(r"sha1 `([0-9a-f]{40})`", spec.read_text()).group(1)
        assert row.sha1 == quoted == "a5e29b35ceae4fcb3782b8fd9228121090ddef64"
    listed = runner.invoke(app, ["weights", "list", "rerank_cirr"])
    assert listed.exit_code == 0, listed.output
    out = listed.output
    assert "sha1 a5e29b35ceae4fcb3782b8fd9228121090ddef64" in out
    assert "unzip models/candidate_rerank_ckpts.zip -d models" in out
    assert "--set finetune.checkpoint=models/stage1/CIRR/saved_models/blip_mean.pt" in out
    assert "--checkpoint models/stage2/CIRR/saved_models/blip_mean.pt" in out
    assert "size 2,772,083,982 B, inside candidate_rerank_ckpts.zip (SHA1 not published" in out

    models = isolated / "models"
    (models / "stage1" / "CIRR" / "saved_models").mkdir(parents=True)
    (models / "candidate_rerank_ckpts.zip").write_bytes(b"PK not the archive")
    (models / "stage1" / "CIRR" / "saved_models" / "blip_mean.pt").write_bytes(b"short")
    with (models / "stage1" / "CIRR" / "cirr_top_200_val.pt").open("wb") as handle:
        handle.truncate(59_948_455)  # the listed size (sparse)
    stage2 = "models/stage2/CIRR/saved_models/blip_mean.pt"
    result = runner.invoke(app, ["weights", "check", "rerank_cirr", "--checkpoint", stage2])
    out = result.output
    assert result.exit_code == 2 and "Traceback" not in out
    assert "[MISMATCH] archive = models/candidate_rerank_ckpts.zip" in out
    assert "published a5e29b35ceae" in out
    assert "published 1,995,000,835 B" in out  # stage I, by its own path
    assert "[ok] rerank.candidates = models/stage1/CIRR/cirr_top_200_val.pt" in out
    assert "present, size verified (no published hash)" in out
    # --checkpoint names stage II's blip_mean.pt: stage II's row (size), not stage I's.
    block = out.split(f"[MISSING] --checkpoint = {stage2}\n")[1].split("\n  [")[0]
    assert "stage II dual encoder" in block and "2,772,083,982" in block
    assert out.count(f"--checkpoint = {stage2}") == 1
    # `get`: the zip by hand (OneDrive), then unzip; each file points at the zip.
    from tests.conftest import bert_vocab_file

    (models / "candidate_rerank_ckpts.zip").unlink()
    sets = ["--set", 'backbone.pretrained=""', "--set", f"backbone.tokenizer={bert_vocab_file()}"]
    got = runner.invoke(app, ["weights", "get", "rerank_cirr", *sets])
    assert got.exit_code == 2 and "Traceback" not in got.output
    assert "save the file as models/candidate_rerank_ckpts.zip" in got.output
    assert "then: unzip models/candidate_rerank_ckpts.zip -d models" in got.output
    assert f"by hand: {stage2} comes in models/candidate_rerank_ckpts.zip" in got.output


def test_check_lists_every_missing_input_at_once(isolated: Path) -> None:
    result = runner.invoke(app, ["weights", "check", "blip4cir_cirr"])
    assert result.exit_code == 2
    out = result.output
    # Both required inputs in one run (before: one failed start each), with source and --set.
    assert "[MISSING] backbone.pretrained = models/model_base.pth" in out
    assert "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/" in out
    assert "sha1 5f1d8cdfae91e22a35e98a4bbb4c43be7bd0ac50" in out
    assert "[MISSING] backbone.tokenizer = bert-base-uncased" in out
    # The published checkpoints are listed with their SHA1s and the exact lines to use them.
    assert "--set finetune.checkpoint=models/blip4cir/cirr/tuned_blip_mean.pt" in out
    assert "--checkpoint models/blip4cir/cirr/combiner_mean.pt" in out
    assert "67dca8a1905802cfd4cd02f640abb0579f1f88fd" in out
    assert "2 input(s) missing or wrong" in out
    assert "Traceback" not in out


def test_check_verifies_hashes(isolated: Path) -> None:
    from tests.conftest import bert_vocab_file

    vocab = bert_vocab_file()
    weights = isolated / "models" / "model_base.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"not the BLIP checkpoint")
    args = ["weights", "check", "blip4cir_cirr", "--set", f"backbone.tokenizer={vocab}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "[MISMATCH] backbone.pretrained" in result.output
    assert "published 5f1d8cdfae91" in result.output
    assert "[ok] backbone.tokenizer" in result.output
    sha1 = hashlib.sha1(weights.read_bytes()).hexdigest()
    result = runner.invoke(app, [*args, "--set", f"backbone.sha1={sha1}"])
    assert result.exit_code == 0, result.output
    assert "every required input is present" in result.output
    # --published counts the missing published checkpoints as problems too.
    result = runner.invoke(app, [*args, "--set", f"backbone.sha1={sha1}", "--published"])
    assert result.exit_code == 2 and "tuned_blip_mean.pt" in result.output.split("error:")[1]


def test_list_every_builtin_recipe(isolated: Path) -> None:
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0, result.output
    headers = re.findall(r"^(\w+): \d+ input\(s\)", result.output, flags=re.M)
    assert headers == builtin_names()
    assert "hf://navervision/zeroshot-cir-models/lincir_large.pt" in result.output
    assert "https://1drv.ms/u/s!Aj0q22vyiZbabxR_hjpQ_DmYX3s?e=k9fmt1" in result.output  # SPRC
    assert "make it with `cir prepare toy-lincir --root data/toy`" in result.output


def test_hf_ref_parsing() -> None:
    assert parse_hf_ref("hf://org/repo/sub/f.pt") == ("org/repo", "sub/f.pt", None)
    assert parse_hf_ref("hf://org/repo/f.pt@v1") == ("org/repo", "f.pt", "v1")
    from cir_cli.errors import CirError

    with pytest.raises(CirError, match="expected hf://org/repo/file"):
        parse_hf_ref("hf://org/f.pt")


# ---------------------------------------------------------------------------------------------
# `get` against a local hub server


PHI = b"phi weights " * 500
COMMIT = "c" * 40


class _Hub(http.server.BaseHTTPRequestHandler):
    files = {
        ("test-org/test-repo", "phi.pt"): PHI,
        ("navervision/zeroshot-cir-models", "lincir_large.pt"): b"not the real file",
    }

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _data(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.files.get(("/".join(parts[:2]), "/".join(parts[4:])))
        return None

    def _reply(self, body: bool) -> None:
        data = self._data()
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._reply(False)

    def do_GET(self) -> None:
        self._reply(True)


@pytest.fixture()
def hub(tmp_path: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "HF_HUB_OFFLINE": "0",
    }
    yield env
    server.shutdown()


def _cir(env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cir_cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_get_fetches_hub_files_then_hf_ref_works_offline(hub: dict, tmp_path: Path) -> None:
    ref = "hf://test-org/test-repo/phi.pt"
    got = _cir(hub, "weights", "get", "toy_clip4cir", "--checkpoint", ref, cwd=tmp_path)
    assert got.returncode == 0, got.stderr + got.stdout
    cached = tmp_path / "hf" / "hub" / "models--test-org--test-repo" / "snapshots" / COMMIT
    assert (cached / "phi.pt").read_bytes() == PHI
    # Offline afterwards: the cache answers check and resolve_checkpoint_ref.
    offline = {**hub, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    check = _cir(offline, "weights", "check", "toy_clip4cir", "--checkpoint", ref, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "[ok] --checkpoint = hf://test-org/test-repo/phi.pt" in check.stdout
    code = (
        "from cir_cli.runs import resolve_checkpoint_ref as r; "
        f"print(r('{ref}', 'runs', 'x', ('finetune',)))"
    )
    resolved = subprocess.run(
        [sys.executable, "-c", code], env=offline, capture_output=True, text=True, timeout=120
    )
    assert Path(resolved.stdout.strip()) == cached / "phi.pt", resolved.stderr
    missing = _cir(
        offline,
        "weights",
        "check",
        "toy_clip4cir",
        "--checkpoint",
        "hf://test-org/test-repo/other.pt",
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and "not in the local hub cache" in missing.stdout


def test_get_rejects_a_file_that_does_not_match_its_published_hash(
    hub: dict, tmp_path: Path
) -> None:
    # backbone.pretrained="" leaves only the published Phi to fetch.
    args = ["weights", "get", "lincir_large", "--published", "--set", 'backbone.pretrained=""']
    got = _cir(hub, *args, cwd=tmp_path)
    assert got.returncode == 2
    assert "lincir_large.pt" in got.stderr and "does not match" in got.stderr
    assert "published 56,653,151 B" in got.stderr


def test_a_downloaded_openai_file_is_checked_against_the_url_hash(isolated: Path) -> None:
    path = isolated / "RN50x4.pt"
    path.write_bytes(b"truncated download")
    result = runner.invoke(
        app, ["weights", "check", "clip4cir_fiq", "--set", f"backbone.pretrained={path}"]
    )
    assert result.exit_code == 2
    assert "[MISMATCH] backbone.pretrained" in result.output
    assert "SHA256" in result.output and "published 7e526bd135e4" in result.output


def test_how_to_get_a_missing_input_names_the_command_curl_page_or_key() -> None:
    """`cir weights get`'s line for an input the hub does not serve, each of its four forms."""

    def row(**kw) -> WeightFile:
        return WeightFile(id="x", what="x", use="backbone.pretrained", **kw)

    made = Input("data.x", "data/x.pt", row(make="cir prepare toy-lincir"))
    assert how_to_get(made) == "make data/x.pt: cir prepare toy-lincir"
    direct = Input("backbone.pretrained", "m/a.pt", row(url="https://openaipublic.x/a.pt"))
    assert how_to_get(direct) == "by hand: curl -L --create-dirs -o m/a.pt https://openaipublic.x/a.pt"
    page = Input("backbone.pretrained", "m/b.pt", row(url="https://drive.example/b"))
    assert how_to_get(page) == "by hand: open https://drive.example/b and save the file as m/b.pt"
    bare = Input("--checkpoint", "runs/c", None, detail="not found")
    assert how_to_get(bare) == "by hand: --checkpoint = runs/c (not found)"
