"""Self-contained HTML pages: the run report (``fedscan.server.report_html``) and a site's
explanations (``fedscan.client.explain_page``).

Everything is inside the file: the CSS inline, images embedded as base64 PNG data URLs, no script
and no external address, so a page opens offline, from an e-mail attachment or a hospital's
locked-down browser, and can be archived as it is. Text from data goes through :func:`escape`.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #ffffff; max-width: 1100px; margin: 0 auto; padding: 1.5rem;
       line-height: 1.45; }
h1 { font-size: 1.6rem; margin: 0 0 0.6rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; padding-bottom: 0.3rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.75rem 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f6f8fa; }
tr.mean td { font-weight: 600; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.15rem 1rem; }
dl.summary dt { color: #57606a; }
dl.summary dd { margin: 0; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #57606a; font-size: 0.9rem; }
.warn { color: #8a1c00; font-weight: 600; }
tr.warn td { background: #fdecea; }
section.case { border-top: 1px solid #d0d7de; margin-top: 1.5rem; }
footer { margin-top: 2.5rem; color: #57606a; font-size: 0.85rem; }
"""


def png_bytes(fig: Any, dpi: int) -> bytes:
    """A matplotlib ``Figure`` drawn with the Agg canvas (no display needed), as PNG bytes; the
    figure is cleared after."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def table(head: list[str], rows: list[tuple[list[str], str]]) -> str:
    """A table from already-escaped cells; each row carries its CSS class ('' for none)."""
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    for cells, cls in rows:
        attr = f' class="{cls}"' if cls else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def figure(png: bytes | None, alt: str, caption: str, img_id: str | None = None) -> str:
    """A <figure> with the PNG embedded; '' without an image."""
    if not png:
        return ""
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    id_attr = f' id="{escape(img_id)}"' if img_id else ""
    return (
        f'<figure><img{id_attr} src="{src}" alt="{escape(alt)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def page(title: str, heading: str, sections: list[str], footer: str) -> str:
    """An HTML5 page; ``title`` and ``heading`` are escaped here, ``sections`` and ``footer`` are HTML."""
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escape(title)}</title>",
            f"<style>{CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{escape(heading)}</h1>",
            *(s for s in sections if s),
            f"<footer>{footer}</footer>",
            "</body>",
            "</html>",
            "",
        ]
    )
