"""The README's Python example runs as written."""
import os
import re
import subprocess
import sys


def test_the_readme_example_runs(tmp_path):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme[readme.index("## Using it from Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "ready: BP016" in done.stdout and "HEALTHY" in done.stdout
