"""Storage: pack files of encoded objects plus the LMDB index (see docs/format.md)."""
