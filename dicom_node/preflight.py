"""Start-up checks of `serve` and `worker`: refuse to start, with one line naming the setting, rather than
fail every job later.

Why: on a multi-host installation a worker host with a corrupt model package, a
missing GPU or no route to the job store would otherwise claim jobs and fail
them one after another (each counted as an attempt), or restart in a loop under
systemd with a traceback nobody reads. Checked before anything is claimed:

- every routing rule's model package loads and verifies (manifest, sha256 of
  its weights: `inference.model.package.load_package`), through the process's
  `ModelRegistry`, so the workers then reuse the verified package;
- each worker's device exists (`cuda` on a host without a GPU is refused);
- the job store is reachable: `storage.database.JobStoreUnreachable`, raised
  when the database is opened, names the URL with its password masked.

`dicom-node config check` runs the same model and device checks.
"""

from __future__ import annotations

from collections.abc import Sequence

from dicom_node.settings import RoutingRule
from dicom_node.worker import ModelRegistry


class StartupCheckFailed(Exception):
    """A start-up check failed; the message is the one line to print (names the setting to fix)."""


def check_models(rules: Sequence[RoutingRule], registry: ModelRegistry) -> list[str]:
    """Load and verify each rule's model package once (no rules: no model is ever run); returns the packages'
    display names in rule order. Raises `StartupCheckFailed` naming the first rule whose package is unusable."""
    from inference.errors import ModelPackageError

    first_rule: dict[str, str] = {}
    for rule in rules:
        first_rule.setdefault(rule.model, rule.name)
    verified = []
    for name, rule_name in first_rule.items():
        try:
            package = registry.get(name)
        except ModelPackageError as exc:
            raise StartupCheckFailed(f'rule "{rule_name}" (model = "{name}"): {exc}') from None
        except (OSError, KeyError, TypeError, AttributeError, ValueError) as exc:  # unreadable files, odd manifest
            raise StartupCheckFailed(
                f'rule "{rule_name}" (model = "{name}"): the package cannot be read: {type(exc).__name__}: {exc}'
            ) from None
        verified.append(package.identity.display)
    return verified


def check_device(device: str, setting: str) -> str:
    """The torch device `device` (cpu, cuda, cuda:N, auto) resolves to on this host; raises
    `StartupCheckFailed` naming `setting` (e.g. `[worker] device`, `--device`) when it does not exist."""
    import torch

    from inference.model.predictor import select_device

    try:
        return str(select_device(None if device == "auto" else device))
    except RuntimeError:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise StartupCheckFailed(
            f'{setting} = "{device}": no such CUDA device on this host ({found} found); use "cpu", "auto" or cuda:N'
        ) from None
    except ValueError as exc:
        raise StartupCheckFailed(f'{setting} = "{device}": {exc}') from None
