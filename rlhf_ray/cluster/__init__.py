"""Running the roles on Ray: the connection, placement, the role group, compute plans, clean-up."""
