"""Flame graph SVG rendered here, in the manner of Brendan Gregg's flamegraph.pl.

Input: folded stacks (`root;...;leaf` -> samples). Output: one self-contained SVG, interactive in
a browser: hover shows a frame's samples and share (title tooltip and the details line), click
zooms into a frame (its ancestors stay visible, faded), "Reset Zoom" or Escape goes back, "Search"
(or Ctrl-F) highlights frames matching a regular expression and shows the share they cover.

Each frame keeps its position in samples (`fg:x`, `fg:w`) so the script can re-lay out on zoom.
Frames narrower than MIN_WIDTH_PX are not drawn (their samples still count in their parents),
which bounds the SVG size for huge profiles, as flamegraph.pl's --minwidth does.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

from .folded import KERNEL_SUFFIX

WIDTH = 1200
FRAME_HEIGHT = 16
FONT_SIZE = 12
FONT_WIDTH = 0.59          # average glyph width / font size for Verdana, as flamegraph.pl uses
MIN_WIDTH_PX = 0.1
X_PAD = 10
TOP_PAD = FONT_SIZE * 3    # title and the buttons line
BOTTOM_PAD = FONT_SIZE * 2 + 10  # details line
#: Frames drawn at most; beyond, the narrowest are dropped (a browser chokes on ~100k elements).
MAX_FRAMES = 50_000


@dataclass
class _Node:
    name: str
    value: int = 0
    children: dict[str, _Node] = field(default_factory=dict)


def build_tree(stacks: Mapping[str, int]) -> _Node:
    root = _Node("all")
    for stack, count in stacks.items():
        if count <= 0:
            continue
        root.value += count
        node = root
        for name in stack.split(";"):
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Node(name)
            child.value += count
            node = child
    return root


def _color(name: str) -> str:
    """Stable colour per name: warm for user code, orange for kernel, grey for unknown."""
    h = zlib.crc32(name.encode())
    v1, v2, v3 = (h & 0xFF) / 255, ((h >> 8) & 0xFF) / 255, ((h >> 16) & 0xFF) / 255
    if name.startswith("[unknown]") or name.startswith("[lost"):
        g = int(170 + 40 * v1)
        return f"rgb({g},{g},{g})"
    if name.endswith(KERNEL_SUFFIX):
        return f"rgb({int(220 + 35 * v1)},{int(110 + 60 * v2)},{int(20 + 40 * v3)})"
    return f"rgb({int(205 + 50 * v3)},{int(230 * v1)},{int(55 * v2)})"


def _fit(name: str, width_px: float) -> str:
    chars = int((width_px - 3) / (FONT_SIZE * FONT_WIDTH))
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


def render_flamegraph(stacks: Mapping[str, int], title: str = "CPU Flame Graph",
                      subtitle: str = "", width: int = WIDTH, unit: str = "samples") -> str:
    """The SVG document as a string."""
    root = build_tree(stacks)
    total = root.value
    scale = (width - 2 * X_PAD) / total if total else 0.0
    min_samples = MIN_WIDTH_PX / scale if scale else 1

    # Walk breadth-agnostic, collecting (depth, x_samples, node); children sorted by name like
    # flamegraph.pl, so identical stacks line up across graphs.
    frames: list[tuple[int, int, _Node]] = []
    todo = [(0, 0, root)]
    while todo:
        depth, x, node = todo.pop()
        frames.append((depth, x, node))
        cx = x
        for name in sorted(node.children):
            child = node.children[name]
            if child.value >= min_samples:
                todo.append((depth + 1, cx, child))
            cx += child.value
    if len(frames) > MAX_FRAMES:
        frames.sort(key=lambda f: -f[2].value)
        frames = frames[:MAX_FRAMES]
    max_depth = max((d for d, _, _ in frames), default=0)
    height = TOP_PAD + (max_depth + 1) * FRAME_HEIGHT + BOTTOM_PAD

    out = [
        '<?xml version="1.0" standalone="no"?>\n',
        f'<svg version="1.1" width="{width}" height="{height}" onload="init(evt)" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
        'xmlns:xlink="http://www.w3.org/1999/xlink" '
        'xmlns:fg="http://github.com/jonhoo/inferno">\n',
        f'<!-- {escape(title)}: {total} {unit}. Click a frame to zoom, Ctrl-F to search. -->\n',
        '<defs><linearGradient id="background" y1="0" y2="1" x1="0" x2="0">'
        '<stop stop-color="#eeeeee" offset="5%"/><stop stop-color="#eeeeb0" offset="95%"/>'
        '</linearGradient></defs>\n',
        f'<style type="text/css">{_CSS}</style>\n',
        f'<script type="text/ecmascript"><![CDATA[\nvar fgTotal = {total}, fgUnit = '
        f'{quoteattr(unit)}, fgXPad = {X_PAD}, fgFontW = {FONT_SIZE * FONT_WIDTH};\n{_JS}]]></script>\n',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="url(#background)"/>\n',
        f'<text id="title" x="{width / 2}" y="{FONT_SIZE * 2}">{escape(title)}</text>\n',
        f'<text id="subtitle" x="{width / 2}" y="{FONT_SIZE * 3}">{escape(subtitle)}</text>\n'
        if subtitle else "",
        f'<text id="unzoom" class="hide" x="{X_PAD}" y="{FONT_SIZE * 2}">Reset Zoom</text>\n',
        f'<text id="search" x="{width - X_PAD - 100}" y="{FONT_SIZE * 2}">Search</text>\n',
        f'<text id="matched" x="{width - X_PAD - 100}" y="{height - FONT_SIZE}"> </text>\n',
        f'<text id="details" x="{X_PAD}" y="{height - FONT_SIZE}"> </text>\n',
        '<g id="frames">\n',
    ]
    for depth, x, node in sorted(frames, key=lambda f: (f[0], f[1])):
        px = X_PAD + x * scale
        w = node.value * scale
        y = height - BOTTOM_PAD - (depth + 1) * FRAME_HEIGHT
        share = 100.0 * node.value / total if total else 0.0
        name = node.name if depth else "all"
        info = f"{name} ({node.value:,} {unit}, {share:.2f}%)"
        out.append(
            f'<g><title>{escape(info)}</title>'
            f'<rect x="{px:.2f}" y="{y}" width="{w:.2f}" height="{FRAME_HEIGHT - 1}" '
            f'fill="{_color(name) if depth else "rgb(230,160,40)"}" rx="2" ry="2" '
            f'fg:x="{x}" fg:w="{node.value}"/>'
            f'<text x="{px + 3:.2f}" y="{y + FRAME_HEIGHT - 4}">{escape(_fit(name, w))}</text></g>\n'
        )
    out.append("</g>\n</svg>\n")
    return "".join(out)


_CSS = """
text { font-family: Verdana, sans-serif; font-size: 12px; fill: rgb(0,0,0); }
#title { text-anchor: middle; font-size: 17px; }
#subtitle { text-anchor: middle; fill: rgb(90,90,90); }
#search, #unzoom { cursor: pointer; }
#search:hover, #unzoom:hover { fill: rgb(0,0,200); }
#frames > g { cursor: pointer; }
#frames > g:hover > rect { stroke: black; stroke-width: 0.5; }
.hide { display: none; }
.parent { opacity: 0.5; }
"""

# The script: frames carry their extent in samples (fg:x, fg:w); zoom rescales every frame
# from those, search tests every frame's name and sums the union of matching extents.
_JS = r"""
var svg, frames, details, matchedText, unzoomBtn, searchBtn, svgWidth;
var zoomX = 0, zoomW = 0, currentSearch = null;
var FGNS = "http://github.com/jonhoo/inferno";
function init(evt) {
  svg = document.documentElement;
  frames = document.getElementById("frames");
  details = document.getElementById("details");
  matchedText = document.getElementById("matched");
  unzoomBtn = document.getElementById("unzoom");
  searchBtn = document.getElementById("search");
  svgWidth = parseFloat(svg.getAttribute("width"));
  zoomW = fgTotal;
  frames.addEventListener("click", function (e) {
    var g = frameOf(e.target); if (g) zoom(g);
  });
  frames.addEventListener("mouseover", function (e) {
    var g = frameOf(e.target); if (g) details.textContent = "Function: " + nameOf(g);
  });
  frames.addEventListener("mouseout", function () { details.textContent = " "; });
  unzoomBtn.addEventListener("click", unzoom);
  searchBtn.addEventListener("click", searchPrompt);
  window.addEventListener("keydown", function (e) {
    if (e.keyCode === 114 || ((e.ctrlKey || e.metaKey) && e.keyCode === 70)) {
      e.preventDefault(); searchPrompt();
    } else if (e.keyCode === 27) { unzoom(); resetSearch(); }
  });
}
function frameOf(el) {
  while (el && el.parentNode !== frames) el = el.parentNode;
  return el;
}
function nameOf(g) { return g.getElementsByTagName("title")[0].firstChild.nodeValue; }
function labelOf(g) { var t = nameOf(g); return t.substring(0, t.lastIndexOf(" (")); }
function ext(g) {
  var r = g.getElementsByTagName("rect")[0];
  return [parseFloat(r.getAttributeNS(FGNS, "x")), parseFloat(r.getAttributeNS(FGNS, "w")),
          parseFloat(r.getAttribute("y"))];
}
function layout() {
  var scale = (svgWidth - 2 * fgXPad) / zoomW, els = frames.children;
  for (var i = 0; i < els.length; i++) {
    var g = els[i], e = ext(g), r = g.getElementsByTagName("rect")[0];
    var t = g.getElementsByTagName("text")[0];
    var x0 = Math.max(e[0], zoomX), x1 = Math.min(e[0] + e[1], zoomX + zoomW);
    if (x1 <= x0) { g.classList.add("hide"); continue; }
    g.classList.remove("hide");
    // Ancestors of the zoomed frame are wider than the view: draw them faded.
    if (e[0] < zoomX || e[0] + e[1] > zoomX + zoomW) g.classList.add("parent");
    else g.classList.remove("parent");
    var px = fgXPad + (x0 - zoomX) * scale, w = (x1 - x0) * scale;
    r.setAttribute("x", px.toFixed(2)); r.setAttribute("width", w.toFixed(2));
    t.setAttribute("x", (px + 3).toFixed(2));
    var label = labelOf(g), n = Math.floor((w - 3) / fgFontW);
    t.textContent = n < 3 ? "" : (label.length <= n ? label : label.substring(0, n - 2) + "..");
  }
}
function zoom(g) {
  var e = ext(g); zoomX = e[0]; zoomW = e[1];
  unzoomBtn.classList.remove("hide");
  layout(); if (currentSearch) search(currentSearch);
}
function unzoom() {
  zoomX = 0; zoomW = fgTotal; unzoomBtn.classList.add("hide");
  layout(); if (currentSearch) search(currentSearch);
}
function resetSearch() {
  currentSearch = null; matchedText.textContent = " ";
  var els = frames.children;
  for (var i = 0; i < els.length; i++) {
    var r = els[i].getElementsByTagName("rect")[0], orig = r.getAttribute("data-fill");
    if (orig) { r.setAttribute("fill", orig); r.removeAttribute("data-fill"); }
  }
  searchBtn.textContent = "Search";
}
function searchPrompt() {
  if (currentSearch) { resetSearch(); return; }
  var term = prompt("Search for (regular expression):", "");
  if (term) search(term);
}
function search(term) {
  var re;
  try { re = new RegExp(term); } catch (err) { alert("Bad regular expression: " + err.message); return; }
  resetSearch(); currentSearch = term;
  var els = frames.children, spans = [];
  for (var i = 0; i < els.length; i++) {
    var g = els[i];
    if (!re.test(labelOf(g))) continue;
    var r = g.getElementsByTagName("rect")[0], e = ext(g);
    r.setAttribute("data-fill", r.getAttribute("fill"));
    r.setAttribute("fill", "rgb(230,0,230)");
    spans.push([e[0], e[0] + e[1]]);
  }
  // Nested matches (a recursive function) must not count twice: merge the sample ranges.
  spans.sort(function (a, b) { return a[0] - b[0] || b[1] - a[1]; });
  var covered = 0, end = -1;
  for (var j = 0; j < spans.length; j++) {
    var lo = Math.max(spans[j][0], zoomX, end), hi = Math.min(spans[j][1], zoomX + zoomW);
    if (hi > lo) covered += hi - lo;
    end = Math.max(end, spans[j][1]);
  }
  searchBtn.textContent = "Reset Search";
  matchedText.textContent = "Matched: " + (100 * covered / zoomW).toFixed(1) + "%";
}
"""
