"""Where results go: the BluIce result line, stdout, the JSON-lines record, the GUI."""
