"""``python -m matrec.models``: print the presets table of docs/models.md."""
from .zoo import print_presets_table

print_presets_table()
