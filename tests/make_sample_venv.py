"""Make a fresh venv holding the handler guide's example package (docs/examples/handler, handler
``checksum-mem``), installed with pip, on top of this project's environment (as if ublk-runner
were installed there too).

    python tests/make_sample_venv.py DIR
"""
import os
import subprocess
import sys
import sysconfig

venv = sys.argv[1]
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
py = os.path.join(venv, "bin", "python")
vsite = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
with open(os.path.join(vsite, "ublk_runner_env.pth"), "w") as f:
    f.write(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                os.path.join(repo, "docs", "examples", "handler")], check=True)
