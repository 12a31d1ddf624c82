"""Rate–accuracy studies: ``platform evaluate`` measures every point of a sweep and writes the report."""
