"""Jobs: the record and its store, and the kinds of work (analysis, generation, vector jobs) behind one interface."""
