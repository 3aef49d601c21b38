"""What tests share: paths and subprocess runners, tiny corpora and projects. Tests import from here, never from
another test module."""
