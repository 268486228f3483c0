"""Federation without Flower: the server/client protocol both sides import, and the personalization methods."""
