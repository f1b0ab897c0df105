"""Jars from Maven Central (`mvn dependency:copy-dependencies`), cached once complete."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

from streams.dev.console import DevError, Progress


def fetch_jars(
    *,
    pom: Path,
    version_property: str,
    libs: Path,
    main_jar: str,
    product: str,
    version: str,
    fallback: str,
    version_hint: str,
    progress: Progress,
) -> Path:
    """`mvn dependency:copy-dependencies` into a staging folder renamed to `libs` when complete,
    so an interrupted fetch never leaves a cache that looks whole."""
    if (libs / main_jar).exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise DevError(
            f"Maven (mvn) not found: install it (apt-get install maven) to fetch {product}, "
            f"or run with {fallback}"
        )
    staging = libs.parent / f"libs.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True, exist_ok=True)
    log_path = libs.parent / "fetch.log"
    cmd = [
        mvn, "-B", "-f", str(pom), version_property,
        "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
    ]  # fmt: skip
    progress(f"fetching {product} {version} jars from Maven Central (once; cached in {libs})")
    downloaded = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None  # for the type checker: stdout=PIPE above
        for line in proc.stdout:
            log.write(line)
            if "Downloaded from" in line:
                downloaded += 1
                if downloaded % 10 == 0:
                    progress(f"  ... {downloaded} artifacts downloaded")
        code = proc.wait()
    if code != 0 or not (staging / main_jar).exists():
        shutil.rmtree(staging, ignore_errors=True)
        raise DevError(
            f"could not fetch {product} {version} jars from Maven Central (mvn exit {code}; "
            f"log: {log_path}): check access to Maven Central and that {version_hint}"
        )
    if libs.exists():  # another process won the race: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    else:
        staging.rename(libs)
    progress(f"  fetched {sum(1 for _ in libs.glob('*.jar'))} jars")
    return libs
