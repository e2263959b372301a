"""Look at a checkpoint scan the way a person does: `mlflow ui` on 127.0.0.1, the experiment in headless
Chromium, screenshots of (1) the experiment's first screen as it opens, (2) the runs table (the scan's parent
run expanded into its per-checkpoint child runs) and (3) the chart view, whose first section is the eval curve.

    python scripts/mlflow_ui_screenshot.py --demo                      # tiny scan first, then screenshots
    python scripts/mlflow_ui_screenshot.py --db outputs/mlflow.db      # the newest scan in an existing store
    python scripts/mlflow_ui_screenshot.py --db outputs/mlflow.db --experiment train_eval/2026-11-24_05-51-36

Needs: pip install playwright (the Python package only) and a Chromium binary: Debian's
(apt-get install chromium -> /usr/bin/chromium, used when present) or `playwright install chromium`.
Prints the PNG paths; exits non-zero when the UI or the browser cannot be started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo_scan(workdir: Path, db: Path) -> None:
    """3 tiny checkpoints + 1 broken one, scanned with `python run.py -m mode=loss ckpt=glob:...`."""
    import json

    sys.path.insert(0, str(REPO))
    from tests import factories

    tok = factories.make_tokenizer(workdir / "tok")
    for seed, step in enumerate((100, 200, 300, 400)):
        factories.make_hf_checkpoint(workdir / "ckpts" / f"step_{step}", tok, seed=seed)
    cfg_path = workdir / "ckpts" / "step_400" / "config.json"  # broken: config and weights disagree
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_hidden_layers": 3}))
    shards = factories.make_token_shards(workdir / "shards", lengths=(3000, 2000))
    proc = factories.run_cli(["-m", "mode=loss", "ckpt=glob:ckpts/step_*", "data=local",
                              f"data.dataset_path={shards}", "eval.seq_len=64", "eval.steps=-1",
                              f"tracking.uri=sqlite:///{db}", f"hydra.sweep.dir={workdir / 'sweep'}"],
                             cwd=workdir, timeout=600)
    print(proc.stdout[-2500:])
    if proc.returncode not in (0, 1):  # 1 = the scan finished with a failed job (the broken checkpoint)
        sys.exit(f"demo scan failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def newest_sweep(db: Path, experiment: str | None):
    """The newest scan parent run (in `experiment`, or in any experiment: one per training run) + its children."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    if not ids:
        sys.exit(f"no experiment {experiment!r} in {db}: run a scan first (python run.py -m ckpt='glob:...')")
    parents = client.search_runs(ids, "tags.`ckpteval.sweep` = 'true'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    if not parents:
        sys.exit(f"no scan parent run in {experiment or 'any experiment'} of {db}: run a scan first")
    exp_id = parents[0].info.experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return exp_id, parents[0], children


def start_ui(db: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"mlflow ui exited ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    sys.exit("mlflow ui did not answer on /health within 90 s")


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None  # playwright's own download, if `playwright install chromium` was run


def close_side_panel(page) -> None:
    """MLflow 3's assistant panel takes a third of the width; close it when it is there."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.last.click()
        page.wait_for_timeout(500)


def screenshots(url: str, experiment_id: str, parent, children, out_dir: Path) -> list[Path]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("playwright is not installed: pip install playwright (and apt-get install chromium)")
    shots = []
    sys.path.insert(0, str(REPO / "src"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # (1) The experiment as it first opens: no clicks, nothing closed or widened.
        page.goto(f"{url}/#/experiments/{experiment_id}", wait_until="load")
        try:
            page.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=60_000)
        except Exception:  # noqa: BLE001 - the first screen may not list runs at all: record what it shows
            print("first screen: the scan's parent run is not visible without a click", file=sys.stderr)
        page.wait_for_timeout(4000)
        shots.append(out_dir / "mlflow_ui_first_screen.png")
        page.screenshot(path=str(shots[-1]))
        # (2) The runs table as the scan's printed link opens it (key metrics as columns), parent expanded.
        from ckpteval.tracking.naming import view_urls

        table_url, charts_url = view_urls(url, experiment_id)
        page.goto(table_url, wait_until="load")
        page.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=120_000)
        close_side_panel(page)
        row = page.locator(".ag-row", has=page.get_by_text(parent.info.run_name, exact=True)).first
        expand = row.locator("button[data-component-id*='runnamecellrenderer']")
        if expand.count():
            expand.first.click()
        for child in children:
            page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shots.append(out_dir / "mlflow_ui_runs.png")
        page.screenshot(path=str(shots[-1]))
        # (3) The chart view: its first section should be the eval curve (the parent's history vs step).
        page = browser.new_page(viewport={"width": 1600, "height": 1000})  # a fresh page: a hash-only change
        page.goto(charts_url, wait_until="load")                             # leaves the SPA half-loaded
        try:
            page.get_by_text("eval/loss", exact=True).first.wait_for(timeout=60_000)
        except Exception:  # noqa: BLE001 - record what the view shows instead
            print("charts: no eval/loss chart visible", file=sys.stderr)
        close_side_panel(page)
        page.wait_for_timeout(3000)
        shots.append(out_dir / "mlflow_ui_charts.png")
        page.screenshot(path=str(shots[-1]))
        browser.close()
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("outputs/mlflow.db"), help="sqlite MLflow store")
    parser.add_argument("--experiment", default=None, help="default: the experiment of the newest scan")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="dir for the PNGs")
    parser.add_argument("--demo", action="store_true", help="run a tiny 4-checkpoint scan into a temp store first")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.db.resolve()
    if args.demo:
        workdir = Path(tempfile.mkdtemp(prefix="ckpteval_ui_demo_"))
        db = workdir / "mlflow.db"
        run_demo_scan(workdir, db)
    if not db.exists():
        sys.exit(f"{db} does not exist: pass --db PATH or --demo")
    experiment_id, parent, children = newest_sweep(db, args.experiment)
    port = args.port or free_port()
    ui = start_ui(db, port)
    try:
        shots = screenshots(f"http://127.0.0.1:{port}", experiment_id, parent, children, args.out.resolve())
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
    print(f"sweep {parent.info.run_name}: {len(children)} child run(s)")
    for shot in shots:
        print(f"screenshot: {shot}")


if __name__ == "__main__":
    main()
