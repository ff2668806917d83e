"""The page ``dvc plots show`` writes (``dvc_plots/index.html``), drawn without network access.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN: offline its CSV plots are blank space. The
project's ``.dvc/config`` names another page template (``plots.html_template``), written here: DVC's page with
the three libraries inlined in one classic ``<script>`` (no ``src``, nothing fetched) and without DVC's
``{scripts}`` placeholder, so that DVC's CDN ``<script src=...>`` tags have nowhere to go. The JavaScript is the
bundle that the pinned PyPI package ``vl-convert-python`` ships (Vega-Embed, Vega-Lite, Vega and their
dependencies, bundled locally by ``vl_convert.javascript_bundle``); it defines ``vegaEmbed`` as a global, which
DVC's plot ``<div>``s call.

The template is generated, not committed (the JavaScript comes from the package installed from the registry):
``TEMPLATE``, in DVC's git-ignored ``.dvc/tmp/`` (where ``make clean``, which removes ``.stein/``, leaves it), written
when missing by every ``stein`` command (:func:`ensure_template`, from the CLI's set-up) or by ``python -m
tasks.infra.offline_plots``. Until then (a fresh clone in which no ``stein`` command ran) ``dvc plots show`` stops with
DVC's "HTML template has to contain '{plot_divs}'". Bundling takes a few seconds, so the page is kept once per
installed vl-convert version in the environment's ``share/`` folder and copied from there into each project (a
test's copy of the repository costs a file copy).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("stein")

#: The template, relative to the project root; ``.dvc/config`` names it (relative to ``.dvc/``).
TEMPLATE = Path(".dvc") / "tmp" / "stein-plots-template.html"

#: Bump when the page below changes: a template with another first line is written again.
REVISION = 1
MARKER = f"<!-- stein offline template r{REVISION}:"

#: DVC's plot templates (``dvc plots templates``) are Vega-Lite v5 specifications: bundle the last v5 release
#: vl-convert carries, so Vega-Embed compiles them with the major version they declare.
VEGA_LITE_VERSION = "5.21"

#: What the bundle defines on ``window``. Vega-Embed's "Open in Vega Editor" action, the one link of the page to a
#: web site, is off; its export and source actions work offline and stay.
_SNIPPET = """
window.vega = vega;
window.vegaLite = vegaLite;
window.vegaEmbed = (el, spec, opt = {}) => vegaEmbed(el, spec, {
  actions: {export: true, source: true, compiled: true, editor: false}, ...opt});
"""

# DVC's page (dvc_render.html.PAGE_HTML) with the bundle where DVC's {scripts} went.
_PAGE = """{marker} vl-convert-python {version}, Vega-Lite {vl_version} -->
<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot</title>
    <script>
{bundle}
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""

#: DVC's placeholders (dvc_render.html.HTML): the page must hold {plot_divs}, and the bundle none of them.
_PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")


def template_path(root: Path) -> Path:
    return Path(root) / TEMPLATE


def render_page() -> tuple[str, str]:
    """The page template with the bundle inlined, and the vl-convert version it came from. ImportError when
    vl-convert-python is not installed."""
    from importlib.metadata import version

    import vl_convert

    bundle = vl_convert.javascript_bundle(snippet=_SNIPPET, vl_version=VEGA_LITE_VERSION)
    # Inside a classic <script> the HTML parser ends the element at the first "</script"; "<\/" means "</" in
    # every JavaScript string, template and regular expression literal it could stand in.
    bundle = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    if "<!--" in bundle or any(p in bundle for p in _PLACEHOLDERS):
        raise RuntimeError("the Vega bundle holds '<!--' or one of DVC's page placeholders: it cannot be inlined")
    ver = version("vl-convert-python")
    return _PAGE.format(marker=MARKER, version=ver, vl_version=VEGA_LITE_VERSION, bundle=bundle), ver


def _cache_path(ver: str) -> Path:
    return Path(sys.prefix) / "share" / "stein-pipeline" / f"dvc-plots-template-r{REVISION}-vl-convert-{ver}.html"


def _write(path: Path, text: str) -> None:
    """Write atomically (two stage processes may write the same template at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_current(path: Path) -> bool:
    """Whether ``path`` is a template of this revision (read: its first line only)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def ensure_template(root: Path, *, force: bool = False) -> Path | None:
    """Write the project's template unless a current one is there; return its path (None, writing nothing, when
    ``root`` is no DVC project: a ``stein`` command run elsewhere must not create a ``.dvc`` folder). Uses the
    environment's copy for the installed vl-convert version, bundling (a few seconds) only when there is none.
    ImportError when vl-convert-python is not installed."""
    if not (Path(root) / ".dvc").is_dir():
        return None
    path = template_path(root)
    if not force and is_current(path):
        return path
    from importlib.metadata import version

    ver = version("vl-convert-python")  # PackageNotFoundError is an ImportError
    cache = _cache_path(ver)
    if force or not is_current(cache):
        text, ver = render_page()
        try:
            _write(_cache_path(ver), text)
        except OSError:  # a read-only environment: no shared copy, the project's is still written
            pass
    else:
        text = cache.read_text(encoding="utf-8")
    _write(path, text)
    log.debug("wrote %s: `dvc plots show` draws its plots offline (Vega from vl-convert-python %s)", TEMPLATE, ver)
    return path


def ensure_template_quietly(root: Path) -> None:
    """:func:`ensure_template` for a command's set-up: never fails the command; says once what is missing."""
    try:
        ensure_template(root)
    except ImportError:
        log.warning("vl-convert-python is not installed (run `make install`): `dvc plots show` cannot use the "
                    "offline page %s", TEMPLATE)
    except Exception as exc:  # noqa: BLE001 - a page for `dvc plots show` must never stop a pipeline command
        log.warning("could not write %s for `dvc plots show`: %s: %s", TEMPLATE, type(exc).__name__, exc)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from tasks.infra.runtime import project_root

    parser = argparse.ArgumentParser(prog="python -m tasks.infra.offline_plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="bundle again even if a current template is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = project_root()
    path = ensure_template(root, force=args.force)
    if path is None:
        print(f"{root} is not a DVC project (no .dvc folder): nothing written", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
