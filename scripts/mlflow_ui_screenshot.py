"""Look at a checkpoint scan the way a person does: `mlflow ui` on 127.0.0.1, every entry point in headless
Chromium, each in a FRESH browser profile (MLflow 3.17 remembers the GenAI / Model-training toggle in the
browser's localStorage, so a used profile would hide what a new user sees). Screenshots:

  mlflow_ui_first_screen.png    the bare experiment URL (#/experiments/ID), no parameters, no clicks
  mlflow_ui_scan_link.png       the `View:` link the scan printed, as it opens
  mlflow_ui_job_link.png        the `View:` link a single `mode=loss` job printed, as it opens (--demo only)
  mlflow_ui_list_toggle.png     the experiments list (#/experiments), one click on the sidebar's "Model training",
                                one click on the experiment: where the user lands
  mlflow_ui_list_toggle_view.png   the same, then "Views" -> "ckpteval: key metrics": the key-metric columns
  mlflow_ui_list_param.png      the experiments list with ?workflowType=machine_learning, one click on the
                                experiment: where the user lands (MLflow drops the parameter on that click)
  mlflow_ui_runs.png            the runs table through the printed link with compareRunsMode=TABLE: the saved
                                view's key-metric columns, the scan's parent expanded into its child runs

    python scripts/mlflow_ui_screenshot.py --demo                      # tiny scan + one job first, then screenshots
    python scripts/mlflow_ui_screenshot.py --db outputs/mlflow.db      # the newest scan in an existing store
    python scripts/mlflow_ui_screenshot.py --db outputs/mlflow.db --experiment train_eval/2026-11-24_05-51-36

Needs: pip install playwright (the Python package only) and a Chromium binary: Debian's
(apt-get install chromium -> /usr/bin/chromium, used when present) or `playwright install chromium`.
Prints the PNG paths and, per screen, the URL the browser ended on and whether the eval curve (or the key-metric
columns) is on it; exits 1 when a check fails, non-zero when the UI or the browser cannot be started.
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


def run_demo_scan(workdir: Path, db: Path) -> dict[str, str]:
    """3 tiny checkpoints + 1 broken one, scanned with `python run.py -m mode=loss ckpt=glob:...`, then one
    `mode=loss` job on step_300 (same experiment). Returns the `View:` link each printed."""
    import json

    sys.path.insert(0, str(REPO))
    from tests import factories

    tok = factories.make_tokenizer(workdir / "tok")
    for seed, step in enumerate((100, 200, 300, 400)):
        factories.make_hf_checkpoint(workdir / "ckpts" / f"step_{step}", tok, seed=seed)
    cfg_path = workdir / "ckpts" / "step_400" / "config.json"  # broken: config and weights disagree
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "num_hidden_layers": 3}))
    shards = factories.make_token_shards(workdir / "shards", lengths=(3000, 2000))
    common = ["data=local", f"data.dataset_path={shards}", "eval.seq_len=64", "eval.steps=-1",
              f"tracking.uri=sqlite:///{db}"]
    links = {}
    for what, args in (("scan", ["-m", "mode=loss", "ckpt=glob:ckpts/step_*", f"hydra.sweep.dir={workdir / 'sweep'}"]),
                       ("job", ["mode=loss", "ckpt=ckpts/step_300", f"hydra.run.dir={workdir / 'job'}"])):
        proc = factories.run_cli(args + common, cwd=workdir, timeout=600)
        tail = [ln for ln in proc.stdout.splitlines() if ln.startswith(("results:", "summary:", "MLflow:", "View:"))]
        print(f"--- {what} (exit {proc.returncode}) printed:\n" + "\n".join(tail))
        if proc.returncode not in (0, 1):  # 1 = the scan finished with a failed job (the broken checkpoint)
            sys.exit(f"demo {what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        views = [ln[len("View: "):] for ln in tail if ln.startswith("View: ")]
        if not views:
            sys.exit(f"the demo {what} printed no View: line")
        links[what] = views[-1]
    return links


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
    experiment = client.get_experiment(parents[0].info.experiment_id)
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return experiment, parents[0], children


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


def shoot(browser, url: str, out: Path, wait_text: str | None, click=None) -> tuple[str, bool]:
    """Open `url` in a fresh profile, run `click(page)`, wait up to 60 s for `wait_text`, screenshot.
    Returns (the URL the page ended on, whether `wait_text` showed up)."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.goto(url, wait_until="load")
    if click is not None:
        click(page)
    found = False
    if not wait_text:
        page.wait_for_timeout(5000)  # let the page settle (and its side panel open) before it is closed
    if wait_text:
        try:
            page.get_by_text(wait_text, exact=True).first.wait_for(timeout=60_000)
            found = True
        except Exception as exc:  # noqa: BLE001 - record what the screen shows instead
            print(f"{out.name}: {wait_text!r} not visible ({type(exc).__name__})", file=sys.stderr)
    close_side_panel(page)
    page.wait_for_timeout(3000)  # charts finish drawing
    page.screenshot(path=str(out))
    end_url = page.url
    context.close()
    return end_url, found


def click_experiment(name: str, toggle: bool):
    def click(page) -> None:
        page.locator("a.experiment-link", has_text=name).first.wait_for(timeout=60_000)
        if toggle:  # the sidebar's GenAI / Model training switch: stored in the browser for every later visit
            page.get_by_role("button", name="Model training").click()
            page.wait_for_timeout(500)
        page.locator("a.experiment-link", has_text=name).first.click()
    return click


def pick_saved_view(then):
    """After `then(page)`: the runs page's "Views" button, then ckpteval's saved view (key metrics as columns)."""
    from ckpteval.tracking.naming import VIEW_NAME

    def click(page) -> None:
        then(page)
        page.get_by_role("button", name="Views").first.click()
        page.get_by_text(VIEW_NAME, exact=True).first.click()
    return click


def expand_parent(parent, children):
    def click(page) -> None:
        page.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=120_000)
        close_side_panel(page)
        row = page.locator(".ag-row", has=page.get_by_text(parent.info.run_name, exact=True)).first
        expand = row.locator("button[data-component-id*='runnamecellrenderer']")
        if expand.count():
            expand.first.click()
        for child in children:
            page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=60_000)
    return click


def screenshots(url: str, experiment, parent, children, links: dict[str, str], out_dir: Path) -> list[tuple]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("playwright is not installed: pip install playwright (and apt-get install chromium)")
    from ckpteval.tracking.naming import view_urls

    exp_id, exp_name = experiment.experiment_id, experiment.name
    table_url, _ = view_urls(url, exp_id)
    # (name, url, text that shows the check passed, clicks)
    screens = [("first_screen", f"{url}/#/experiments/{exp_id}", None, None)]
    screens += [(f"{what}_link", link, "eval/loss", None) for what, link in links.items()]
    screens += [("list_toggle", f"{url}/#/experiments", parent.info.run_name, click_experiment(exp_name, toggle=True)),
                ("list_toggle_view", f"{url}/#/experiments", "eval/loss",
                 pick_saved_view(click_experiment(exp_name, toggle=True))),
                ("list_param", f"{url}/#/experiments?workflowType=machine_learning", None,
                 click_experiment(exp_name, toggle=False)),
                ("runs", table_url, "eval/loss", expand_parent(parent, children))]
    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        for name, target, wait_text, click in screens:
            png = out_dir / f"mlflow_ui_{name}.png"
            end_url, found = shoot(browser, target, png, wait_text, click)
            results.append((name, png, end_url, found))
        browser.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("outputs/mlflow.db"), help="sqlite MLflow store")
    parser.add_argument("--experiment", default=None, help="default: the experiment of the newest scan")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="dir for the PNGs")
    parser.add_argument("--demo", action="store_true", help="run a tiny 4-checkpoint scan and one job into a temp store first")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    db, links = args.db.resolve(), {}
    if args.demo:
        workdir = Path(tempfile.mkdtemp(prefix="ckpteval_ui_demo_"))
        db = workdir / "mlflow.db"
        links = run_demo_scan(workdir, db)
    if not db.exists():
        sys.exit(f"{db} does not exist: pass --db PATH or --demo")
    experiment, parent, children = newest_sweep(db, args.experiment)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    if args.demo:  # the printed links name `mlflow ui`'s default address; this UI runs on a free port
        links = {what: link.replace("http://127.0.0.1:5000", url, 1) for what, link in links.items()}
    else:
        from ckpteval.tracking.naming import VIEW_TAG, view_urls

        links = {"scan": view_urls(url, experiment.experiment_id, VIEW_TAG in experiment.tags)[1]}
    ui = start_ui(db, port)
    try:
        shots = screenshots(url, experiment, parent, children, links, args.out.resolve())
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)
    print(f"sweep {parent.info.run_name}: {len(children)} child run(s) in experiment {experiment.name}")
    failed = False
    for name, png, end_url, found in shots:
        if name in ("first_screen", "list_param"):  # what MLflow does without our parameter: shown, not checked
            verdict = "for reference"
        elif name == "list_toggle":  # (the runs table with MLflow's default columns)
            ok = "/runs" in end_url and "workflowType=machine_learning" in end_url
            verdict, failed = ("ok: Model-training runs page" if ok else "FAILED: not the runs page"), failed or not ok
        else:
            verdict, failed = ("ok: eval/loss on screen" if found else "FAILED: no eval/loss"), failed or not found
        print(f"{name:13s} {verdict:32s} {png}\n{'':14s}ended on {end_url}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
