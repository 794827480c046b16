"""Print the project's pinned dependencies from pyproject.toml, one per line, for the image's
dependency layer (the code is not in the build yet). With a local label (``cpu``), torch
and torchvision are pinned to that build: ``torch==2.14.1+cpu``.

Usage: python3 requirements.py pyproject.toml [local-label]
"""

import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
label = sys.argv[2] if len(sys.argv) > 2 else ""
for requirement in dependencies:
    if label and re.fullmatch(r"(torch|torchvision)==[0-9.]+", requirement):
        requirement = f"{requirement}+{label}"
    print(requirement)
