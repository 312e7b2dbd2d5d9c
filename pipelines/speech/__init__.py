"""Voice notes: decoding (audio), Whisper model resolution (models), transcription engines (engines), medical
vocabulary biasing (lexicon), encoder features for the core (features), synthetic dictations (dictation) and
their evaluation (evaluate). Modules are imported on use so that `import pipelines.speech` stays light."""
