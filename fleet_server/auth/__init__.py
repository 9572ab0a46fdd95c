"""Who is calling: bearer API tokens with roles (admin ⊃ operator ⊃ viewer) and device
credentials, which can only act as their own device."""
