"""Everything that imports napari or Qt: widgets, layer <-> prompt conversion, sample data."""
