"""`spark-setup download`: fetch a model variant (and its MTP draft), or any hub file, resumable and verified."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .. import catalog
from ..errors import UsageError
from .common import JsonOpt, ModelsDirOpt, PrefixOpt, StateDirOpt, settings_from


def register(app: typer.Typer) -> None:
    @app.command("download")
    def download(
        variant: str = typer.Option(catalog.DEFAULT_VARIANT, "--variant",
                                    help=f"Model variant: {', '.join(catalog.BASES)}."),
        with_mtp: bool = typer.Option(False, "--with-mtp", help="Also fetch the MTP draft that pairs with it."),
        repo: Optional[str] = typer.Option(None, "--repo", help="Any hub repo (OWNER/NAME), with --file."),
        file: Optional[str] = typer.Option(None, "--file", help="A file path inside --repo."),
        revision: Optional[str] = typer.Option(None, "--revision",
                                               help="Branch, tag or commit (default: the pin, else main)."),
        connections: int = typer.Option(8, "--connections", "-c", help="Parallel connections per file (1-32)."),
        verify: bool = typer.Option(False, "--verify", help="Re-hash files already verified."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network; use what is on disk."),
        token: Optional[str] = typer.Option(None, "--token", help="Hugging Face token (else HF_TOKEN or `hf auth login`).",
                                            show_default=False),
        pins: Optional[Path] = typer.Option(None, "--pins", help="JSON file of known-good pins (commit, sha256, size)."),
        repin: bool = typer.Option(False, "--repin", help="Forget the pin and pin what --revision serves now."),
        models_dir: Optional[Path] = ModelsDirOpt,
        prefix: Optional[Path] = PrefixOpt,
        state_dir: Optional[Path] = StateDirOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Download, verify (SHA-256 against pinned values) and atomically place model files. Resumable."""
        from .. import download as dl

        settings = settings_from(prefix=prefix, models_dir=models_dir, state_dir=state_dir)
        if (repo is None) != (file is None):
            raise UsageError("--repo and --file go together", "give both, or neither for a catalog variant")
        reporter = dl.LogReporter() if as_json else True
        common = dict(connections=connections, verify=verify, offline=offline, token=token, progress=reporter,
                      pins_file=pins, repin=repin)
        if repo is not None:
            if with_mtp or variant != catalog.DEFAULT_VARIANT:
                raise UsageError("--variant/--with-mtp do not apply to --repo/--file", "drop them")
            result = dl.download_file(settings, repo, file, revision=revision, **common)
        else:
            result = dl.download_variant(settings, variant, with_mtp=with_mtp, revision=revision, **common)
        if as_json:
            typer.echo(json.dumps(result.to_json(), indent=2))
            return
        for f in result.files:
            word = {"verified": "re-hashed, matches the pin" if verify else "verified, nothing to do",
                    "downloaded": "downloaded and verified"}.get(f["status"], f["status"])
            typer.echo(f"{f['label']}: {word}  ({dl.human(f['size'])}, SHA-256 {(f['sha256'] or '')[:16]}…, "
                       f"commit {f['commit'][:12]})  {f['path']}")
        if result.current:
            typer.echo(f"current model: {result.current} -> {Path(result.files[0]['path']).name}")
