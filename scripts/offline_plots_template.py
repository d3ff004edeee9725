"""Write .dvc/plots/offline.html, DVC's `dvc plots show/diff` page with Vega inlined so it renders
offline, and point this clone's DVC at it (`plots.html_template` in .dvc/config.local).

DVC's own page loads vega, vega-lite and vega-embed from a CDN (dvc_render.vega.VegaRenderer.SCRIPTS)
and is blank without network; no Vega JS ships in the dvc / dvc-render packages. The page has no
`{scripts}` placeholder (so DVC adds no CDN tag) and carries the same three releases DVC asks for,
packed by npm (BSD-3-Clause, UW Interactive Data Lab). It is a generated, git-ignored file: the project
ships the script, not the libraries. scripts/install.sh runs it when npm is installed:
    python scripts/offline_plots_template.py            # needs npm
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots" / "offline.html"
# the releases dvc_render.vega.VegaRenderer.SCRIPTS names (dvc-render 1.0.2)
PACKAGES = (("vega", "5.20.2", "build/vega.min.js"), ("vega-lite", "5.2.0", "build/vega-lite.min.js"),
            ("vega-embed", "6.18.2", "build/vega-embed.min.js"))
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {names}: inlined from the npm registry by scripts/offline_plots_template.py (BSD-3-Clause,
         University of Washington Interactive Data Lab), so this page needs no network -->
{scripts_inline}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> int:
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, version, member in PACKAGES:
            subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                js = tar.extractfile(f"package/{member}").read().decode("utf-8")
            js = "\n".join(line for line in js.splitlines() if not line.startswith("//# sourceMappingURL="))
            bad = [p for p in PLACEHOLDERS + ("</script",) if p in js]
            if bad:    # DVC replaces the placeholders anywhere in the page; </script would end the tag
                raise SystemExit(f"{name}@{version}: contains {bad}; cannot inline it")
            parts.append(f"    <script>/* {name}@{version} */\n{js}\n    </script>")
    names = ", ".join(f"{n}@{v}" for n, v, _ in PACKAGES)
    page = PAGE.replace("{names}", names).replace("{scripts_inline}", "\n".join(parts))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(page, encoding="utf-8")
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template",
                    str(OUT.relative_to(ROOT / ".dvc"))], cwd=ROOT, check=True)
    print(f"{OUT.relative_to(ROOT)}: {len(page.encode()):,} bytes ({names}); plots.html_template set in "
          ".dvc/config.local")
    return 0


if __name__ == "__main__":
    sys.exit(main())
