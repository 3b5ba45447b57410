"""Models by name (tiny:*, scaled:*, real:* built offline; hub names; paths) and how the roles load them."""
