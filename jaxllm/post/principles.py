"""The written principles of Constitutional AI: read from a text or YAML file.

A text file holds one principle a line; blank lines and lines starting with `#` are skipped.
A YAML file (`.yaml`, `.yml`) holds a list of strings, or a mapping whose `principles` key
does. A file with no principles is refused.
"""

from pathlib import Path

from jaxllm.config import ConfigError


def read_principles(path: str | Path) -> list[str]:
    """The principles of the file at `path`; raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--principles: {str(path)!r} is not a file")
    text = path.read_text(encoding="utf-8-sig")  # without a byte-order mark
    if path.suffix.lower() in (".yaml", ".yml"):
        principles = _yaml_principles(text, path)
    else:
        principles = [line.strip() for line in text.split("\n")
                      if line.strip() and not line.strip().startswith("#")]
    if not principles:
        raise ConfigError(f"--principles: {path} holds no principles")
    return principles


def _yaml_principles(text: str, path: Path) -> list[str]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--principles: {path} is not YAML ({error})") from None
    if isinstance(value, dict):
        value = value.get("principles")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"--principles: {path} must hold a list of strings, or a mapping "
                          "whose 'principles' key does")
    return [p.strip() for p in value if p.strip()]
