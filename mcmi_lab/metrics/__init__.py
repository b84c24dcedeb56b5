"""CMI I(X; Ŷ | Y), NCMI, the streaming meter, and the statistics behind every report number."""
