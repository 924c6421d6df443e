# One image for web, worker, beat and the mail catcher (see docker-compose.yml).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 NURTURE_INSTANCE=/app/instance
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -e . && useradd --create-home nurture \
    && mkdir -p /app/instance/outbox && chown -R nurture /app/instance
USER nurture
EXPOSE 8000
CMD ["gunicorn", "web:app", "--bind", "0.0.0.0:8000"]
