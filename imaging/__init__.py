"""Reading scans and masks in every format and layout, the error type, options and atomic writes: the bottom layer."""
