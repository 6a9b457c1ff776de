// Refresh the door camera image once a second (the door loop writes a new frame every web.live_interval_s).
(function () {
  const img = document.getElementById("live");
  if (!img) return;
  setInterval(function () { img.src = "/live/frame.jpg?t=" + Date.now(); }, 1000);
})();
