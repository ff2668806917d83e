"""`dvc plots show`, typed as a user types it, writes a page that draws every plot of dvc.yaml without a network.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN (its CSV plots are blank offline); .dvc/config names
the project's template instead (``tasks.infra.offline_plots``: the libraries inlined from the pinned vl-convert-python),
which every ``stein`` command writes when it is missing. Checked here in a copy of the repository whose plot files
are stand-ins (a fresh clone has none: they are pipeline outputs):

- the page names nothing remote: no ``<script src>``, ``<link>``, ``<iframe>`` or CSS import; every ``src`` is a
  relative path; outside the one inline bundle the only URLs are the specs' ``$schema`` identifiers;
- it has one ``vegaEmbed`` call per CSV plot of dvc.yaml and one image per image plot;
- headless Chromium, with no network at all (a network namespace of its own) and its net log on, draws every
  CSV plot (an SVG with the plotted line) and the page asks for no http(s) resource (skipped without Chromium).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Chromium's own background requests (updates, time) are not the page's: the browser marks them "not an origin".
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps"]


def _dvc_plots(root: Path) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """dvc.yaml's plots: ``{csv path: (x, y)}`` and the image paths."""
    csv, images = {}, []
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for plot in stage.get("plots", []):
            if isinstance(plot, str):
                images.append(plot)
            else:
                (path, props), = plot.items()
                csv[path] = (props["x"], props["y"])
    return csv, images


def _png(width: int = 8, height: int = 8) -> bytes:
    """A small valid grey PNG (no imaging library needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes([128]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def shown(tmp_path_factory, project_copier):
    """A copy of the repository with stand-in plot files, after one `stein` command (which writes the template)
    and a plain `dvc plots show`: (copy, dvc_plots/index.html text, csv plots, image plots)."""
    root = project_copier(tmp_path_factory.mktemp("offline_plots") / "repo")
    csv, images = _dvc_plots(root)
    assert csv and images
    for i, (path, (x, y)) in enumerate(sorted(csv.items())):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        rows = [f"{x},{y}"] + [f"{10 * k},{(i + 1) / (k + 1):.4f}" for k in range(1, 9)]
        (root / path).write_text("\n".join(rows) + "\n")
    for path in images:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(_png())
    template = root / ".dvc" / "tmp" / "stein-plots-template.html"
    assert not template.exists()
    # any stein command sets the project up; this one reads dvc.yaml and writes nothing else
    subprocess.run([sys.executable, "-m", "flows.cli", "dvc-yaml", "--check"], cwd=root, capture_output=True,
                   timeout=120)
    assert template.is_file(), "a stein command did not write the offline template"
    proc = subprocess.run([str(VENV_BIN / "dvc"), "plots", "show"], cwd=root, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = root / "dvc_plots" / "index.html"
    return root, page.read_text(encoding="utf-8"), csv, images


def _split_bundle(html: str) -> tuple[str, str]:
    """(the page without its one inline script element in <head>, the script's text)."""
    head = html[: html.index("</head>")]
    starts = [m.start() for m in re.finditer(r"<script\b", head)]
    assert len(starts) == 1 and head[starts[0]:].startswith("<script>"), "one inline <script> in <head>"
    end = html.index("</script>", starts[0])
    return html[: starts[0]] + html[end + len("</script>"):], html[starts[0] + len("<script>"): end]


def test_the_page_names_nothing_remote(shown):
    _, html, _, _ = shown
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"<(link|iframe|embed|object|base)\b", html, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", html, re.I)
    for src in re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", html, re.I):
        if not src.startswith("${"):  # a template literal inside the bundle's code, not an attribute
            assert not re.match(r"([a-z]+:)?//", src, re.I), src
    page, bundle = _split_bundle(html)
    assert len(bundle) > 300_000 and "vegaEmbed" in bundle  # the libraries themselves, inline
    # Outside the bundle the only URLs are the specs' "$schema" identifiers (Vega-Embed reads the Vega-Lite
    # version from them; nothing fetches them).
    schemas = re.findall(r'"\$schema": "(https://vega\.github\.io/schema/vega-lite/v5\.json)"', page)
    assert len(schemas) == page.count("vegaEmbed(")
    rest = re.sub(r'"\$schema": "https://vega\.github\.io/schema/[^"]*"', "", page)
    assert "http://" not in rest and "https://" not in rest and "//cdn" not in rest


def test_every_plot_of_dvc_yaml_is_on_the_page(shown):
    _, html, csv, images = shown
    specs = re.findall(r"var spec = (\{.*?\});\s*vegaEmbed\('#([^']+)', spec\);", html, re.S)
    titles = {json.loads(spec)["title"]["text"] for spec, _ in specs}
    assert titles == set(csv)
    imgs = re.findall(r'<img src="(static/[^"]+)"', html)
    assert len(imgs) == len(images)


def _net_log_page_requests(log: Path) -> list[str]:
    """The URLs a page asked for, from Chromium's net log (the browser's own requests carry no origin)."""
    events = json.loads(log.read_text())["events"]
    return sorted({p["url"] for e in events if (p := e.get("params") or {}).get("url") and "method" in p
                   and p.get("initiator") != "not an origin"})


def _chromium(url: str, out_dir: Path, *extra: str) -> tuple[str, list[str]]:
    """Load ``url`` in headless Chromium in a network namespace of its own (no interface but a down loopback):
    (the DOM after 20 s of virtual time, the URLs the page requested)."""
    net_log = out_dir / "netlog.json"
    unshare = ["unshare", "-n"] if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 \
        else []
    if not unshare:  # no namespaces here: every http(s) request goes to a closed port instead
        extra = (*extra, "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>")
    proc = subprocess.run([*unshare, CHROMIUM, *BROWSER_FLAGS, *extra, "--virtual-time-budget=20000",
                           f"--log-net-log={net_log}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180, cwd=out_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, _net_log_page_requests(net_log)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian's chromium package)")
def test_chromium_draws_every_plot_with_no_network_and_asks_for_nothing(shown, tmp_path):
    root, html, csv, images = shown
    dom, requested = _chromium((root / "dvc_plots" / "index.html").as_uri(), tmp_path)
    assert requested == []
    drawn = {}
    for plot_id in re.findall(r"vegaEmbed\('#([^']+)', spec\)", html):
        start = dom.index(f'<div id="{plot_id}"')
        end = dom.find('<div id="plots_', start + 1)  # the next plot's div, or the end of the page
        div = dom[start:end if end != -1 else None]
        # Vega's SVG renderer: the chart, and its line mark's path with the plotted coordinates
        drawn[plot_id] = 'class="marks"' in div and bool(re.search(r'mark-line[^>]*>.*?<path[^>]*\bd="M[^"]{20,}', div, re.S))
    assert len(drawn) == len(csv) and all(drawn.values()), drawn
    assert dom.count("<img src=") >= len(images)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian's chromium package)")
def test_the_net_log_check_sees_a_page_that_fetches(tmp_path):
    """The check above can fail: DVC's own page would ask for its three scripts from the CDN."""
    from dvc_render.vega import VegaRenderer

    page = tmp_path / "cdn.html"
    page.write_text(f"<html><head>{VegaRenderer.SCRIPTS}</head><body></body></html>")
    _, requested = _chromium(page.as_uri(), tmp_path)
    assert [u for u in requested if u.startswith("https://cdn.jsdelivr.net/npm/vega")], requested


def test_the_template_is_written_once_in_a_dvc_project_and_never_elsewhere(tmp_path):
    """Written when missing or of another revision, left alone when current (every `stein` command asks), and not
    written where there is no .dvc folder (a `stein` command run outside a project must not make one)."""
    import os

    from tasks.infra.offline_plots import MARKER, ensure_template

    assert ensure_template(tmp_path) is None and not (tmp_path / ".dvc").exists()
    (tmp_path / ".dvc").mkdir()
    path = ensure_template(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith(MARKER) and "{plot_divs}" in text and "{refresh_tag}" in text and "{scripts}" not in text
    os.utime(path, ns=(0, 0))
    assert ensure_template(tmp_path) == path and path.stat().st_mtime_ns == 0  # current: not written again
    path.write_text("<!-- stein offline template r0: an older page -->\n{plot_divs}\n")
    assert ensure_template(tmp_path).read_text(encoding="utf-8") == text
