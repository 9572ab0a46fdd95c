"""What every route shares: the application state and the dependency aliases."""
