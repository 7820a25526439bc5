// The live player (Gradio's HLS stream) keeps everything it has buffered, which grows without end in
// continuous mode: every media buffer the page creates drops what lies more than KEEP seconds behind the
// playhead of its video.
() => { const keep = KEEP;
  window.sfSourceBuffers = [];
  const createUrl = URL.createObjectURL;
  URL.createObjectURL = function (object) {
    const url = createUrl.call(URL, object); if (object instanceof MediaSource) object.sfUrl = url; return url; };
  const addBuffer = MediaSource.prototype.addSourceBuffer;
  MediaSource.prototype.addSourceBuffer = function (type) {
    const buffer = addBuffer.call(this, type), source = this;
    window.sfSourceBuffers.push(buffer);
    buffer.addEventListener('updateend', () => {
      const video = [...document.querySelectorAll('video')].find((v) => v.src && v.src === source.sfUrl);
      if (!video || buffer.updating || !buffer.buffered.length) return;
      const start = buffer.buffered.start(0), until = video.currentTime - keep;
      if (until > start + 1) buffer.remove(start, until); });
    return buffer; }; }
