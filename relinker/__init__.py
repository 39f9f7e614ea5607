"""relinker: rebuild lost archive hardlinks from an NTT catalogue without reading file content."""

__version__ = "0.2.0"
